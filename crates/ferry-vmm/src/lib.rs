//! ferry-vmm
