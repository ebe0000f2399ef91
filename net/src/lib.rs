//! baylink's network layer.
