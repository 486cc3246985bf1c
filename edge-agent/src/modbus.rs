//! Modbus access through bus tasks: one task owns each connection (a TCP device, or a serial
//! line that several devices share by unit id), takes calls in order from a channel, and runs
//! each under a timeout with bounded retries. tokio-modbus has no timeout of its own; after a
//! timeout or a transport error the connection is dropped (a late reply would answer the wrong
//! call) and made again on the next try. An exception reply is the device's answer: no retry.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::slave::Slave;

use crate::config::{ModbusConfig, Parity};

/// One Modbus call.
#[derive(Debug, Clone)]
pub enum Op {
    /// Read holding registers: (first, count).
    ReadHolding(u16, u16),
    /// Write one holding register.
    WriteRegister(u16, u16),
    /// Write one coil.
    WriteCoil(u16, bool),
}

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModbusError {
    /// No answer in time, on every try.
    #[error("{target}: no answer within {ms} ms ({tries} tries)")]
    Timeout {
        /// The device's address or line.
        target: String,
        /// The per-call timeout.
        ms: u64,
        /// Tries made.
        tries: u32,
    },
    /// The connection failed, on every try.
    #[error("{target}: {message} ({tries} tries)")]
    Io {
        /// The device's address or line.
        target: String,
        /// What failed.
        message: String,
        /// Tries made.
        tries: u32,
    },
    /// The device answered with an exception.
    #[error("{target}: the device refused the call: {code}")]
    Exception {
        /// The device's address or line.
        target: String,
        /// The exception.
        code: String,
    },
    /// The reply had the wrong shape (fewer registers than asked, say).
    #[error("{target}: a malformed reply: {message}")]
    Malformed {
        /// The device's address or line.
        target: String,
        /// What was wrong.
        message: String,
    },
}

#[derive(Debug, Clone)]
enum Target {
    Tcp(String),
    Serial(PathBuf, u32, Parity),
}

impl Target {
    fn name(&self) -> String {
        match self {
            Target::Tcp(a) => format!("modbus tcp {a}"),
            Target::Serial(p, ..) => format!("modbus rtu {}", p.display()),
        }
    }
}

struct Call {
    unit: u8,
    op: Op,
    reply: oneshot::Sender<Result<Vec<u16>, ModbusError>>,
}

/// A handle on a bus task.
#[derive(Clone)]
pub struct Bus {
    tx: mpsc::Sender<Call>,
    target: String,
}

/// The bus tasks of an agent: one per TCP address or serial line.
#[derive(Default)]
pub struct Buses {
    buses: HashMap<String, Bus>,
}

impl Buses {
    /// The device on `cfg`'s bus, starting the bus task if it is the first on it.
    pub fn device(&mut self, cfg: &ModbusConfig) -> Device {
        let target = match (&cfg.address, &cfg.serial) {
            (Some(a), _) => Target::Tcp(a.clone()),
            (None, Some(p)) => Target::Serial(p.clone(), cfg.baud, cfg.parity),
            (None, None) => Target::Tcp(String::new()), // refused by the config check
        };
        let name = target.name();
        let bus = self
            .buses
            .entry(name.clone())
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(16);
                tokio::spawn(run(target, cfg.timeout(), cfg.retries, rx));
                Bus { tx, target: name }
            })
            .clone();
        Device { bus, unit: cfg.unit }
    }
}

/// One device (unit) on a bus.
#[derive(Clone)]
pub struct Device {
    bus: Bus,
    unit: u8,
}

impl Device {
    /// Runs a call; registers read, or empty for a write.
    pub async fn call(&self, op: Op) -> Result<Vec<u16>, ModbusError> {
        let (reply, rx) = oneshot::channel();
        let gone =
            || ModbusError::Io { target: self.bus.target.clone(), message: "the bus task is gone".into(), tries: 0 };
        self.bus.tx.send(Call { unit: self.unit, op, reply }).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Reads `count` holding registers from `first`.
    pub async fn read(&self, first: u16, count: u16) -> Result<Vec<u16>, ModbusError> {
        let regs = self.call(Op::ReadHolding(first, count)).await?;
        if regs.len() != usize::from(count) {
            return Err(ModbusError::Malformed {
                target: self.bus.target.clone(),
                message: format!("asked for {count} registers from {first}, got {}", regs.len()),
            });
        }
        Ok(regs)
    }

    /// Reads one holding register.
    pub async fn read_one(&self, addr: u16) -> Result<u16, ModbusError> {
        Ok(self.read(addr, 1).await?[0])
    }

    /// The device's address or line, for messages.
    pub fn target(&self) -> &str {
        &self.bus.target
    }
}

async fn connect(target: &Target, unit: u8) -> std::io::Result<Context> {
    match target {
        Target::Tcp(addr) => {
            let addr = tokio::net::lookup_host(addr)
                .await?
                .next()
                .ok_or_else(|| std::io::Error::other(format!("{addr} resolves to nothing")))?;
            tokio_modbus::client::tcp::connect_slave(addr, Slave(unit)).await
        }
        Target::Serial(path, baud, parity) => open_serial(path, *baud, *parity)
            .await
            .map(|line| tokio_modbus::client::rtu::attach_slave(line, Slave(unit))),
    }
}

/// Opens a serial line as two non-blocking descriptors (one to read, one to write) on tokio's
/// reactor, so a call cut off by its timeout leaves no read pending on a blocking thread to
/// swallow the next reply, then sets the line up with stty while they are open. No serial crate
/// (and no libudev) in the agent.
#[cfg(unix)]
async fn open_serial(
    path: &std::path::Path,
    baud: u32,
    parity: Parity,
) -> std::io::Result<impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> {
    let mut open = tokio::net::unix::pipe::OpenOptions::new();
    open.unchecked(true);
    let rx = open.open_receiver(path)?;
    let tx = open.open_sender(path)?;
    let out = tokio::process::Command::new("stty")
        .arg("-F")
        .arg(path)
        .arg(baud.to_string())
        .args(["raw", "-echo", "cs8", "clocal", "cread"])
        .args(parity.stty())
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr);
        return Err(std::io::Error::other(format!(
            "stty could not set {baud} baud, parity {parity} on the line: {}",
            said.trim()
        )));
    }
    Ok(tokio::io::join(rx, tx))
}

/// Serial lines are for the Pi (Linux); elsewhere, a clear error.
#[cfg(not(unix))]
async fn open_serial(
    _path: &std::path::Path,
    _baud: u32,
    _parity: Parity,
) -> std::io::Result<tokio::io::Join<tokio::io::Empty, tokio::io::Sink>> {
    Err(std::io::Error::other("Modbus RTU serial lines are supported on Linux and other Unix systems only"))
}

async fn exec(ctx: &mut Context, op: &Op) -> tokio_modbus::Result<Vec<u16>> {
    match *op {
        Op::ReadHolding(first, count) => ctx.read_holding_registers(first, count).await,
        Op::WriteRegister(addr, value) => ctx.write_single_register(addr, value).await.map(|r| r.map(|()| Vec::new())),
        Op::WriteCoil(addr, on) => ctx.write_single_coil(addr, on).await.map(|r| r.map(|()| Vec::new())),
    }
}

async fn run(target: Target, timeout: Duration, retries: u32, mut rx: mpsc::Receiver<Call>) {
    let name = target.name();
    let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let mut ctx: Option<Context> = None;
    while let Some(call) = rx.recv().await {
        let tries = retries + 1;
        let mut result = Err(ModbusError::Timeout { target: name.clone(), ms, tries });
        for attempt in 0..tries {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(50 << attempt.min(4))).await;
            }
            if ctx.is_none() {
                match tokio::time::timeout(timeout, connect(&target, call.unit)).await {
                    Ok(Ok(c)) => ctx = Some(c),
                    Ok(Err(e)) => {
                        result = Err(ModbusError::Io { target: name.clone(), message: e.to_string(), tries });
                        continue;
                    }
                    Err(_) => {
                        result = Err(ModbusError::Timeout { target: name.clone(), ms, tries });
                        continue;
                    }
                }
            }
            let Some(c) = ctx.as_mut() else { continue };
            c.set_slave(Slave(call.unit));
            match tokio::time::timeout(timeout, exec(c, &call.op)).await {
                Ok(Ok(Ok(regs))) => {
                    result = Ok(regs);
                    break;
                }
                Ok(Ok(Err(code))) => {
                    result = Err(ModbusError::Exception { target: name.clone(), code: format!("{code:?}") });
                    break;
                }
                Ok(Err(e)) => {
                    ctx = None;
                    result = Err(ModbusError::Io { target: name.clone(), message: e.to_string(), tries });
                }
                Err(_) => {
                    ctx = None;
                    result = Err(ModbusError::Timeout { target: name.clone(), ms, tries });
                }
            }
        }
        let _ = call.reply.send(result);
    }
}
