//! Simulated studio devices for `kiln up` and the tests: real Modbus TCP servers on loopback
//! (tokio-modbus's server), speaking the register maps of [`crate::config::PrinterMap`] and
//! [`crate::config::LightsMap`] at their defaults.
//!
//! The printer is a state machine: ready → printing (for `print_ms`) → ready, one sheet and some
//! ink used per job; when the paper runs out it shows error 1 (out of paper) until refilled. Either
//! device can be told to stop answering (requests get no reply, as from a device that lost
//! power), to test timeouts.
//!
//! A [`SimLine`] puts devices on one RTU bus by unit id: RTU frames (with their CRC) over TCP on
//! loopback, which `socat pty,link=PATH,raw,echo=0 tcp:ADDR` turns into a terminal the agent opens
//! as its serial line. A unit nobody answers to stays silent, as on a real line.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_modbus::server::{Service, rtu_over_tcp, tcp};
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

use crate::config::{LightsMap, PrinterMap};

const REGISTERS: usize = 16;

/// A printer's starting state.
#[derive(Debug, Clone)]
pub struct PrinterSetup {
    /// Sheets loaded.
    pub media: u16,
    /// Ink, percent.
    pub ink: u16,
    /// Ink used per job, percent.
    pub ink_per_job: u16,
    /// How long a job prints.
    pub print_ms: u64,
}

impl Default for PrinterSetup {
    fn default() -> Self {
        PrinterSetup { media: 50, ink: 100, ink_per_job: 1, print_ms: 300 }
    }
}

#[derive(Debug)]
enum Model {
    Printer { map: PrinterMap, setup: PrinterSetup },
    Lights,
}

#[derive(Debug)]
struct Inner {
    model: Model,
    holding: Mutex<[u16; REGISTERS]>,
    answering: AtomicBool,
    /// Bumped by each start or abort, so a finished timer knows if its job is still the one under way.
    job_epoch: Mutex<u64>,
}

/// A running simulated device. Dropping it stops the server.
pub struct SimDevice {
    addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SimDevice {
    /// A printer listening on `bind` (port 0 for any).
    pub async fn printer(bind: SocketAddr, setup: PrinterSetup) -> std::io::Result<SimDevice> {
        let map = PrinterMap::default();
        let mut regs = [0u16; REGISTERS];
        regs[usize::from(map.status)] = map.ready_value;
        regs[usize::from(map.media)] = setup.media;
        regs[usize::from(map.ink)] = setup.ink;
        if setup.media == 0 {
            regs[usize::from(map.status)] = map.error_value;
            regs[usize::from(map.error_code)] = 1;
        }
        SimDevice::start(bind, Model::Printer { map, setup }, regs).await
    }

    /// A light rig listening on `bind` (port 0 for any).
    pub async fn lights(bind: SocketAddr) -> std::io::Result<SimDevice> {
        SimDevice::start(bind, Model::Lights, [0u16; REGISTERS]).await
    }

    async fn start(bind: SocketAddr, model: Model, regs: [u16; REGISTERS]) -> std::io::Result<SimDevice> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            model,
            holding: Mutex::new(regs),
            answering: AtomicBool::new(true),
            job_epoch: Mutex::new(0),
        });
        let task = serve(listener, Proto::Tcp, Svc::One(inner.clone()));
        Ok(SimDevice { addr, inner, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether it answers requests (false: they hang).
    pub fn set_answering(&self, on: bool) {
        self.inner.answering.store(on, Ordering::SeqCst);
    }

    /// Its holding registers.
    pub fn registers(&self) -> [u16; REGISTERS] {
        *self.inner.holding.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Printer: loads paper and ink and clears an out-of-paper error.
    pub fn refill(&self, media: u16, ink: u16) {
        if let Model::Printer { map, .. } = &self.inner.model {
            let mut r = self.inner.holding.lock().unwrap_or_else(|p| p.into_inner());
            r[usize::from(map.media)] = media;
            r[usize::from(map.ink)] = ink;
            if r[usize::from(map.status)] == map.error_value {
                r[usize::from(map.status)] = map.ready_value;
                r[usize::from(map.error_code)] = 0;
            }
        }
    }
}

impl Inner {
    fn handle(self: &Arc<Self>, req: Request<'static>) -> Result<Response, ExceptionCode> {
        let mut regs = self.holding.lock().unwrap_or_else(|p| p.into_inner());
        let range = |first: u16, count: u16| {
            let (a, n) = (usize::from(first), usize::from(count));
            if n == 0 || a + n > REGISTERS { Err(ExceptionCode::IllegalDataAddress) } else { Ok(a..a + n) }
        };
        match req {
            Request::ReadHoldingRegisters(first, count) => {
                Ok(Response::ReadHoldingRegisters(regs[range(first, count)?].to_vec()))
            }
            Request::WriteSingleRegister(addr, value) => {
                let i = range(addr, 1)?.start;
                if let Model::Lights = self.model {
                    let map = LightsMap::default();
                    if addr == map.brightness && value > map.max_brightness {
                        return Err(ExceptionCode::IllegalDataValue);
                    }
                }
                regs[i] = value;
                Ok(Response::WriteSingleRegister(addr, value))
            }
            Request::WriteSingleCoil(addr, on) => {
                let Model::Printer { map, setup } = &self.model else { return Err(ExceptionCode::IllegalFunction) };
                let status = usize::from(map.status);
                if on && addr == map.start_coil {
                    let ready = regs[status] == map.ready_value
                        && regs[usize::from(map.media)] > 0
                        && regs[usize::from(map.ink)] > 0;
                    if ready {
                        regs[status] = map.busy_value;
                        let epoch = self.bump();
                        let (me, ms) = (self.clone(), setup.print_ms);
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            me.finish_job(epoch);
                        });
                    }
                } else if on && addr == map.abort_coil && regs[status] == map.busy_value {
                    self.bump();
                    regs[status] = map.ready_value;
                } else if addr != map.start_coil && addr != map.abort_coil {
                    return Err(ExceptionCode::IllegalDataAddress);
                }
                Ok(Response::WriteSingleCoil(addr, on))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        }
    }

    fn bump(&self) -> u64 {
        let mut e = self.job_epoch.lock().unwrap_or_else(|p| p.into_inner());
        *e += 1;
        *e
    }

    fn finish_job(&self, epoch: u64) {
        let Model::Printer { map, setup } = &self.model else { return };
        if *self.job_epoch.lock().unwrap_or_else(|p| p.into_inner()) != epoch {
            return; // aborted
        }
        let mut r = self.holding.lock().unwrap_or_else(|p| p.into_inner());
        if r[usize::from(map.status)] != map.busy_value {
            return;
        }
        let (media, ink, jobs) = (usize::from(map.media), usize::from(map.ink), usize::from(map.jobs));
        r[media] = r[media].saturating_sub(1);
        r[ink] = r[ink].saturating_sub(setup.ink_per_job);
        r[jobs] = r[jobs].wrapping_add(1);
        if r[media] == 0 {
            r[usize::from(map.status)] = map.error_value;
            r[usize::from(map.error_code)] = 1;
        } else if r[ink] == 0 {
            r[usize::from(map.status)] = map.error_value;
            r[usize::from(map.error_code)] = 2;
        } else {
            r[usize::from(map.status)] = map.ready_value;
        }
    }
}

/// Simulated devices on one RTU line, by unit id. Dropping it stops the server (the devices'
/// own TCP servers keep running).
pub struct SimLine {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SimLine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SimLine {
    /// A line serving RTU frames over TCP on `bind` (port 0 for any), with `units` on it: the same
    /// simulated devices, reached by their unit ids.
    pub async fn start(bind: SocketAddr, units: &[(u8, &SimDevice)]) -> std::io::Result<SimLine> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let units = units.iter().map(|(id, d)| (*id, d.inner.clone())).collect();
        let task = serve(listener, Proto::RtuOverTcp, Svc::Line(Arc::new(units)));
        Ok(SimLine { addr, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

#[derive(Clone, Copy)]
enum Proto {
    Tcp,
    RtuOverTcp,
}

fn serve(listener: TcpListener, proto: Proto, svc: Svc) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let new_service = move |_| Ok(Some(svc.clone()));
        let on_error = |e| tracing::debug!(error = %e, "simulated device: a connection failed");
        let served = match proto {
            Proto::Tcp => {
                let on_connected = |stream, addr| {
                    let new_service = new_service.clone();
                    async move { tcp::accept_tcp_connection(stream, addr, new_service) }
                };
                tcp::Server::new(listener).serve(&on_connected, on_error).await
            }
            Proto::RtuOverTcp => {
                let on_connected = |stream, addr| {
                    let new_service = new_service.clone();
                    async move { rtu_over_tcp::accept_tcp_connection(stream, addr, new_service) }
                };
                rtu_over_tcp::Server::new(listener).serve(&on_connected, on_error).await
            }
        };
        if let Err(e) = served {
            tracing::warn!(error = %e, "simulated device stopped");
        }
    })
}

/// One device on its own TCP server (the unit id is not looked at, as Modbus TCP devices mostly
/// do), or the units of a line.
#[derive(Clone)]
enum Svc {
    One(Arc<Inner>),
    Line(Arc<Vec<(u8, Arc<Inner>)>>),
}

impl Service for Svc {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = std::future::Ready<Result<Option<Response>, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let device = match self {
            Svc::One(inner) => Some(inner),
            Svc::Line(units) => units.iter().find(|(id, _)| *id == req.slave).map(|(_, d)| d),
        };
        let reply = match device {
            Some(d) if d.answering.load(Ordering::SeqCst) => d.handle(req.request).map(Some),
            _ => Ok(None), // silence: the caller's timeout
        };
        std::future::ready(reply)
    }
}
