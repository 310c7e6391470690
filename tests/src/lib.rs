pub mod harness;
pub mod origin;
