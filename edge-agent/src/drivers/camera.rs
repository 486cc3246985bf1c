//! A camera: a configured command (such as `libcamera-still -o {out}`) or an HTTP snapshot URL.
//! The photo is uploaded to the scheduler as an asset and named in the task's report.

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_protocol::fleet::DeviceTask;
use serde_json::Value;

use super::{Done, TaskCtx, TaskError, run_command};

/// A camera's driver.
pub struct Camera {
    command: Option<Vec<String>>,
    snapshot_url: Option<String>,
    step: Duration,
    photos: u64,
    last: Option<String>,
}

impl Camera {
    pub(super) fn new(command: Option<Vec<String>>, snapshot_url: Option<String>, step: Duration) -> Camera {
        Camera { command, snapshot_url, step, photos: 0, last: None }
    }

    pub(super) async fn run(&mut self, task: &DeviceTask, ctx: &TaskCtx<'_>) -> Result<Done, TaskError> {
        tokio::fs::create_dir_all(ctx.work_dir).await.map_err(|e| TaskError::new(e.to_string()))?;
        let out = ctx.work_dir.join(format!("{}.photo", task.task_id));
        let _ = tokio::fs::remove_file(&out).await;
        match (&self.command, &self.snapshot_url) {
            (Some(argv), _) => run_command(argv, &[("out", &out)], self.step).await?,
            (None, Some(url)) => {
                ctx.http.get_to_file(url, &out, false).await?;
            }
            (None, None) => return Err(TaskError::new("no command or snapshot_url is configured")),
        }
        let len = tokio::fs::metadata(&out).await.map(|m| m.len()).unwrap_or(0);
        if len == 0 {
            return Err(TaskError::new(format!("the camera wrote no photo to {}", out.display())));
        }
        let hash = ctx.http.upload(&out, &task.task_id).await?;
        let _ = tokio::fs::remove_file(&out).await;
        self.photos += 1;
        self.last = Some(hash.clone());
        Ok(Done { detail: format!("photo {hash} ({len} bytes)"), output_asset: Some(hash) })
    }

    pub(super) fn readings(&self) -> BTreeMap<String, Value> {
        let mut r = BTreeMap::new();
        r.insert("photos".into(), Value::from(self.photos));
        if let Some(h) = &self.last {
            r.insert("last_photo".into(), Value::from(h.clone()));
        }
        r
    }
}
