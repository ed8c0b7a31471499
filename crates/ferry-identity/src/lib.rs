//! ferry-identity
