//! Reports: the memory table with the paper's figures beside ours (text, JSON, CSV, and a bar chart as SVG or PNG), and the speed of a
//! training step (images/s, TFLOP/s, MFU).
pub mod memory;
pub mod speed;
