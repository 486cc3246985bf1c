//! A gallery display: a configured command (`{file}`), or a folder a signage player watches
//! (`current.png` and `current.json`, each replaced whole). What is on screen is kept on disk
//! and reported in telemetry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_protocol::fleet::DeviceTask;
use serde_json::{Value, json};

use super::{Done, TaskCtx, TaskError, place_file, run_command, task_asset};
use crate::spool::write_synced;

/// A display's driver.
pub struct Display {
    command: Option<Vec<String>>,
    folder: Option<PathBuf>,
    step: Duration,
    state_dir: PathBuf,
    showing: Option<String>,
}

impl Display {
    pub(super) fn new(
        command: Option<Vec<String>>,
        folder: Option<PathBuf>,
        step: Duration,
        state_dir: &Path,
    ) -> Display {
        let showing = std::fs::read_to_string(state_dir.join("showing")).ok().map(|s| s.trim().to_owned());
        Display { command, folder, step, state_dir: state_dir.to_path_buf(), showing }
    }

    pub(super) async fn run(&mut self, task: &DeviceTask, ctx: &TaskCtx<'_>) -> Result<Done, TaskError> {
        let (hash, path) = task_asset(task, ctx).await?;
        match (&self.command, &self.folder) {
            (Some(argv), _) => run_command(argv, &[("file", &path)], self.step).await?,
            (None, Some(dir)) => {
                let meta = json!({ "asset": hash, "task_id": task.task_id, "at_ms": kiln_protocol::now_ms() });
                place_file(&path, dir, "current.png")
                    .and_then(|()| write_synced(dir, "current.json", meta.to_string().as_bytes()))
                    .map_err(|e| TaskError::new(format!("display folder {}: {e}", dir.display())))?;
            }
            (None, None) => return Err(TaskError::new("no command or folder is configured")),
        }
        write_synced(&self.state_dir, "showing", hash.as_bytes()).map_err(|e| TaskError::new(e.to_string()))?;
        self.showing = Some(hash.clone());
        Ok(Done { detail: format!("showing {hash}"), output_asset: None })
    }

    pub(super) fn readings(&self) -> BTreeMap<String, Value> {
        let mut r = BTreeMap::new();
        r.insert("showing".into(), self.showing.clone().map_or(Value::Null, Value::from));
        r
    }
}
