//! ferry-channel
