//! What each kind of device does with a task, and what it reads for telemetry.

mod camera;
mod display;
mod lights;
mod printer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_protocol::fleet::{DeviceKind, DeviceTask};
use serde_json::Value;

use crate::config::DeviceConfig;
use crate::http::Http;
use crate::modbus::{Buses, ModbusError};

/// What a task needs besides the driver.
pub struct TaskCtx<'a> {
    /// The scheduler's HTTP API.
    pub http: &'a Http,
    /// Where fetched assets are kept.
    pub assets_dir: &'a Path,
    /// Scratch space for this device (photos before upload).
    pub work_dir: &'a Path,
    /// The task's deadline, unix milliseconds.
    pub deadline_ms: i64,
}

/// A task done.
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    /// What was done.
    pub detail: String,
    /// An asset made (a photo), uploaded.
    pub output_asset: Option<String>,
}

/// A task that failed.
#[derive(Debug, Clone)]
pub struct TaskError {
    /// Why.
    pub message: String,
    /// The device stopped answering (Modbus timeouts or broken connections): it is degraded.
    pub device_fault: bool,
}

impl TaskError {
    /// A failure that says nothing about the device's health.
    pub fn new(message: impl Into<String>) -> TaskError {
        TaskError { message: message.into(), device_fault: false }
    }
}

impl From<ModbusError> for TaskError {
    fn from(e: ModbusError) -> TaskError {
        let device_fault = matches!(e, ModbusError::Timeout { .. } | ModbusError::Io { .. });
        TaskError { message: e.to_string(), device_fault }
    }
}

impl From<anyhow::Error> for TaskError {
    fn from(e: anyhow::Error) -> TaskError {
        TaskError::new(format!("{e:#}"))
    }
}

/// Readings for telemetry, or why they could not be taken.
pub type Readings = Result<BTreeMap<String, Value>, TaskError>;

/// A device's driver.
pub enum Driver {
    /// A printer over Modbus.
    Printer(printer::Printer),
    /// A light rig over Modbus.
    Lights(lights::Lights),
    /// A camera.
    Camera(camera::Camera),
    /// A display.
    Display(display::Display),
}

impl Driver {
    /// The driver for a configured device; Modbus devices join their bus.
    pub fn new(cfg: &DeviceConfig, buses: &mut Buses, state_dir: &Path) -> Driver {
        let step = Duration::from_millis(cfg.step_timeout_ms);
        match cfg.kind {
            DeviceKind::Printer => {
                let modbus = cfg.modbus.as_ref().map(|m| buses.device(m)).expect("checked: a printer has modbus");
                Driver::Printer(printer::Printer::new(
                    modbus,
                    cfg.printer.clone(),
                    cfg.command.clone(),
                    cfg.folder.clone(),
                    step,
                ))
            }
            DeviceKind::Lights => {
                let modbus = cfg.modbus.as_ref().map(|m| buses.device(m)).expect("checked: lights have modbus");
                Driver::Lights(lights::Lights::new(modbus, cfg.lights.clone()))
            }
            DeviceKind::Camera => {
                Driver::Camera(camera::Camera::new(cfg.command.clone(), cfg.snapshot_url.clone(), step))
            }
            DeviceKind::Display => {
                Driver::Display(display::Display::new(cfg.command.clone(), cfg.folder.clone(), step, state_dir))
            }
        }
    }

    /// Carries out a task.
    pub async fn run(&mut self, task: &DeviceTask, ctx: &TaskCtx<'_>) -> Result<Done, TaskError> {
        match self {
            Driver::Printer(d) => d.run(task, ctx).await,
            Driver::Lights(d) => d.run(task).await,
            Driver::Camera(d) => d.run(task, ctx).await,
            Driver::Display(d) => d.run(task, ctx).await,
        }
    }

    /// The device's readings.
    pub async fn readings(&mut self) -> Readings {
        match self {
            Driver::Printer(d) => d.readings().await,
            Driver::Lights(d) => d.readings().await,
            Driver::Camera(d) => Ok(d.readings()),
            Driver::Display(d) => Ok(d.readings()),
        }
    }
}

/// Runs a configured command with `{name}` placeholders filled in, under a timeout; the process
/// is killed if the timeout passes.
pub async fn run_command(argv: &[String], fill: &[(&str, &Path)], timeout: Duration) -> Result<(), TaskError> {
    let args: Vec<String> = argv
        .iter()
        .map(|a| fill.iter().fold(a.clone(), |a, (k, v)| a.replace(&format!("{{{k}}}"), &v.to_string_lossy())))
        .collect();
    let (program, rest) = args.split_first().ok_or_else(|| TaskError::new("the command is empty"))?;
    let child = tokio::process::Command::new(program)
        .args(rest)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout, child)
        .await
        .map_err(|_| TaskError::new(format!("{program}: still running after {} s; killed", timeout.as_secs())))?
        .map_err(|e| TaskError::new(format!("{program}: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(TaskError::new(format!("{program}: {}: {}", out.status, err.trim())));
    }
    Ok(())
}

/// The task's asset, fetched and verified.
pub async fn task_asset(task: &DeviceTask, ctx: &TaskCtx<'_>) -> Result<(String, PathBuf), TaskError> {
    let asset = task.asset.as_ref().ok_or_else(|| TaskError::new(format!("a {} task needs an asset", task.kind)))?;
    let path = ctx.http.asset(&asset.url, &asset.hash, ctx.assets_dir).await?;
    Ok((asset.hash.clone(), path))
}

/// Copies `from` into `dir` as `name`, whole or not at all.
pub fn place_file(from: &Path, dir: &Path, name: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::copy(from, &tmp)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))
}
