pub mod harness;
pub mod origin;
pub mod registry;
