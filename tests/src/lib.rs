pub mod origin;
pub mod harness;
