//! Reports: the memory table with the paper's figures beside ours (text, JSON, CSV, SVG).
pub mod memory;
pub mod speed;
