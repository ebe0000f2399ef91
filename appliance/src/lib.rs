//! The baylink appliance.
