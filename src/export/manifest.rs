//! `manifest.json`: what a job produced (files with hashes and sizes), how (method, params,
//! source) and what it measured, so an artifact can be checked and reproduced without quantd.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ManifestFile {
    pub name: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    pub model: String,
    pub base_model: String,
    pub format: &'static str,
    pub method: String,
    pub params: serde_json::Value,
    pub tool: String,
    pub job_id: Option<String>,
    pub files: Vec<ManifestFile>,
    pub metrics: serde_json::Value,
}

impl Manifest {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("manifest serializes")
    }
}
