//! ferry-guest
