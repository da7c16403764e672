//! quantd: quantize language-model checkpoints, measure what each variant lost, and serve the
//! results. `main.rs` only parses the command line; everything else lives in these modules,
//! which depend downward only (see DESIGN §1): http → jobs → quant/export → model → store/db.

pub mod catalog;
pub mod cli;
pub mod config;
pub mod db;
pub mod engine;
pub mod eval;
pub mod export;
pub mod formats;
pub mod http;
pub mod jobs;
pub mod json_errors;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod process_tuning;
pub mod quant;
pub mod startup;
pub mod store;
pub mod telemetry;
