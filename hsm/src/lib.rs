//! baylink HSM access.
