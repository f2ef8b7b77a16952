//! Reports: plots (SVG) shared by the stages that draw one.

pub mod compare;
pub mod paired;
pub mod plot;
