//! One run of a sweep as `sweep.json` records it: its cell, status and metrics.

use super::metrics::Metrics;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Not run yet (the sweep is still going, or was interrupted before it).
    Pending,
    Ok,
    Failed,
}

/// One run of the sweep, as `sweep.json` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Its folder's name.
    pub name: String,
    pub run_dir: PathBuf,
    /// The grid axes' values (YAML text).
    pub cell: BTreeMap<String, String>,
    /// The repeat axes' values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub repeat: BTreeMap<String, String>,
    pub status: Status,
    /// Finished by an earlier `recover sweep`, not run again.
    #[serde(default)]
    pub reused: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wall_s: Option<f64>,
    #[serde(flatten)]
    pub metrics: Metrics,
}
