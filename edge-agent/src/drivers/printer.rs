//! A printer: status, media, ink and a job counter in holding registers; start and abort coils.
//! The file goes to the printer by a configured command (a CUPS `lp` line) or a spool folder.
//! A print never starts while the printer is not ready, and one print runs at a time (a device
//! carries out its tasks in order).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use kiln_protocol::fleet::DeviceTask;
use serde_json::{Value, json};

use super::{Done, Readings, TaskCtx, TaskError, place_file, run_command, task_asset};
use crate::config::PrinterMap;
use crate::modbus::{Device, Op};

/// A printer's driver.
pub struct Printer {
    modbus: Device,
    map: PrinterMap,
    command: Option<Vec<String>>,
    folder: Option<PathBuf>,
    step: Duration,
}

struct Status {
    status: u16,
    media: u16,
    ink: u16,
    jobs: u16,
    error_code: u16,
}

impl Printer {
    pub(super) fn new(
        modbus: Device,
        map: PrinterMap,
        command: Option<Vec<String>>,
        folder: Option<PathBuf>,
        step: Duration,
    ) -> Printer {
        Printer { modbus, map, command, folder, step }
    }

    /// The status registers: one read when they lie within 32 registers of each other.
    async fn status(&self) -> Result<Status, TaskError> {
        let m = &self.map;
        let addrs = [m.status, m.media, m.ink, m.jobs, m.error_code];
        let (lo, hi) = (addrs.iter().min().copied().unwrap_or(0), addrs.iter().max().copied().unwrap_or(0));
        let v: Vec<u16> = if hi - lo < 32 {
            let regs = self.modbus.read(lo, hi - lo + 1).await?;
            addrs.iter().map(|a| regs[usize::from(a - lo)]).collect()
        } else {
            let mut v = Vec::with_capacity(addrs.len());
            for a in addrs {
                v.push(self.modbus.read_one(a).await?);
            }
            v
        };
        Ok(Status { status: v[0], media: v[1], ink: v[2], jobs: v[3], error_code: v[4] })
    }

    fn state_name(&self, s: &Status) -> &'static str {
        match s.status {
            v if v == self.map.ready_value => "ready",
            v if v == self.map.busy_value => "printing",
            v if v == self.map.error_value => "error",
            _ => "unknown",
        }
    }

    pub(super) async fn run(&mut self, task: &DeviceTask, ctx: &TaskCtx<'_>) -> Result<Done, TaskError> {
        let (hash, path) = task_asset(task, ctx).await?;
        let before = self.status().await?;
        if before.status != self.map.ready_value || before.media == 0 || before.ink == 0 {
            return Err(TaskError::new(format!(
                "the printer is not ready (status {}, error code {}, media {}, ink {}%); nothing was printed",
                self.state_name(&before),
                before.error_code,
                before.media,
                before.ink
            )));
        }
        match (&self.command, &self.folder) {
            (Some(argv), _) => run_command(argv, &[("file", &path)], self.step).await?,
            (None, Some(dir)) => place_file(&path, dir, &format!("{}-{hash}.png", task.task_id))
                .map_err(|e| TaskError::new(format!("spool folder {}: {e}", dir.display())))?,
            (None, None) => return Err(TaskError::new("no command or spool folder is configured")),
        }
        self.modbus.call(Op::WriteCoil(self.map.start_coil, true)).await?;
        let until = tokio::time::Instant::now() + self.step;
        loop {
            tokio::time::sleep(Duration::from_millis(self.map.poll_ms)).await;
            let now = self.status().await?;
            // The job counter moving is the job done, even if the printer then shows an error
            // (the last sheet used: out of paper).
            if now.jobs != before.jobs && now.status != self.map.busy_value {
                return Ok(Done {
                    detail: format!(
                        "printed {hash} (job {}; printer {}, media left {}, ink {}%)",
                        now.jobs,
                        self.state_name(&now),
                        now.media,
                        now.ink
                    ),
                    output_asset: None,
                });
            }
            if now.status == self.map.error_value {
                return Err(TaskError::new(format!(
                    "the printer stopped with error code {} ({})",
                    now.error_code,
                    error_name(now.error_code)
                )));
            }
            if tokio::time::Instant::now() >= until || kiln_protocol::now_ms() > ctx.deadline_ms {
                let _ = self.modbus.call(Op::WriteCoil(self.map.abort_coil, true)).await;
                return Err(TaskError::new(format!(
                    "the print did not finish within {} s; aborted",
                    self.step.as_secs()
                )));
            }
        }
    }

    pub(super) async fn readings(&mut self) -> Readings {
        let s = self.status().await?;
        let mut r = BTreeMap::new();
        r.insert("printer_state".into(), json!(self.state_name(&s)));
        r.insert("media".into(), Value::from(s.media));
        r.insert("ink_percent".into(), Value::from(s.ink));
        r.insert("jobs".into(), Value::from(s.jobs));
        r.insert("error_code".into(), Value::from(s.error_code));
        Ok(r)
    }
}

fn error_name(code: u16) -> &'static str {
    match code {
        0 => "none",
        1 => "out of paper",
        2 => "out of ink",
        3 => "paper jam",
        _ => "unknown",
    }
}
