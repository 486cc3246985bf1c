//! A small client of the scheduler's `/v1` API for the CLI, the worker daemon (asset uploads),
//! the benchmark and the tests: JSON calls with the bearer token, raw bytes for assets, and a
//! reader of a job's event stream.

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use kiln_protocol::Secret;

/// What can go wrong talking to the farm.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached.
    #[error("cannot reach the farm at {url}: {source}")]
    Connect {
        /// Where.
        url: String,
        /// Why.
        source: hyper_util::client::legacy::Error,
    },
    /// The response broke off.
    #[error("reading the response from {url}: {source}")]
    Read {
        /// Where.
        url: String,
        /// Why.
        source: hyper::Error,
    },
    /// The server said no; `message` is its error message.
    #[error("{status}: {message}")]
    Status {
        /// The status.
        status: StatusCode,
        /// The API's message (which names the field).
        message: String,
    },
    /// The server answered something that is not the expected JSON.
    #[error("unexpected response from {url}: {message}")]
    Protocol {
        /// Where.
        url: String,
        /// What.
        message: String,
    },
    /// A bad URL or header.
    #[error("bad request to build: {0}")]
    Build(#[from] hyper::http::Error),
}

/// What can go wrong saving a download.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The farm's side.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Writing the file.
    #[error("writing the file: {0}")]
    Io(#[from] std::io::Error),
}

/// A response: status, headers and body.
#[derive(Debug)]
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: hyper::HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// A request body: bytes in memory, or a file streamed from disk.
type Body = BoxBody<Bytes, std::io::Error>;

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A client of one farm.
#[derive(Clone)]
pub struct Client {
    http: HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, Body>,
    base: String,
    token: Option<Secret>,
}

impl Client {
    /// A client of the farm at `base` (e.g. `http://127.0.0.1:7878`, or `https://…`, trusting
    /// the system's roots and the farm's own CA: [`crate::tls`]).
    pub fn new(base: &str, token: Option<Secret>) -> Client {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.enforce_http(false);
        let conn = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*crate::tls::client_config()).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(conn);
        let http = HyperClient::builder(TokioExecutor::new()).pool_max_idle_per_host(256).build(conn);
        Client { http, base: base.trim_end_matches('/').to_owned(), token }
    }

    /// The farm's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request and reads the whole response, whatever its status.
    pub async fn send(&self, method: Method, path: &str, body: Option<Bytes>) -> Result<Reply, ClientError> {
        self.send_with(method, path, body, &[]).await
    }

    /// [`Self::send`] with extra headers.
    pub async fn send_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, ClientError> {
        let (url, resp) = self.open(method, path, body, headers).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|source| ClientError::Read { url, source })?.to_bytes();
        Ok(Reply { status: parts.status, headers: parts.headers, body })
    }

    /// PUTs a file, streamed from disk (an asset of any size), and reads the whole response.
    pub async fn put_file(&self, path: &str, file: &std::path::Path) -> Result<Reply, DownloadError> {
        let f = tokio::fs::File::open(file).await?;
        let frames = futures_util::TryStreamExt::map_ok(tokio_util::io::ReaderStream::new(f), hyper::body::Frame::data);
        let body = StreamBody::new(frames).boxed();
        let (url, resp) = self.open_body(Method::PUT, path, body, "application/octet-stream", &[]).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|source| ClientError::Read { url, source })?.to_bytes();
        Ok(Reply { status: parts.status, headers: parts.headers, body })
    }

    /// Sends a request with the token and returns the response unread, with its URL.
    async fn open(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        headers: &[(&str, &str)],
    ) -> Result<(String, hyper::Response<hyper::body::Incoming>), ClientError> {
        let kind = if body.is_some() { "application/json" } else { "" };
        self.open_body(method, path, full(body.unwrap_or_default()), kind, headers).await
    }

    /// [`Self::open`] with any body and its content type (none when empty).
    async fn open_body(
        &self,
        method: Method,
        path: &str,
        body: Body,
        content_type: &str,
        headers: &[(&str, &str)],
    ) -> Result<(String, hyper::Response<hyper::body::Incoming>), ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder().method(method).uri(&url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {}", t.expose()));
        }
        if !content_type.is_empty() {
            req = req.header("content-type", content_type);
        }
        let req = req.body(body)?;
        let resp = self.http.request(req).await.map_err(|source| ClientError::Connect { url: url.clone(), source })?;
        Ok((url, resp))
    }

    /// [`Self::open`] for a GET whose body is streamed: a non-2xx answer is read whole and
    /// returned as the API's error.
    async fn open_stream(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(String, hyper::body::Incoming), ClientError> {
        let (url, resp) = self.open(Method::GET, path, None, headers).await?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.into_body().collect().await.map_err(|source| ClientError::Read { url, source })?.to_bytes();
            return Err(error_of(status, &body));
        }
        Ok((url, resp.into_body()))
    }

    /// A JSON call: 2xx answers the body; anything else is a [`ClientError::Status`] carrying
    /// the API's message.
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        self.call_as(method, path, body.map(|b| Bytes::from(b.to_string()))).await
    }

    /// [`Self::call`] with a body already written, its answer read as `T`: a caller that reads
    /// a few fields of it need not build a tree of the whole.
    pub async fn call_as<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<T, ClientError> {
        let reply = self.send(method, path, body).await?;
        check(&reply)?;
        serde_json::from_slice(&reply.body)
            .map_err(|e| ClientError::Protocol { url: format!("{}{path}", self.base), message: e.to_string() })
    }

    /// `GET path`, its answer read as `T` (one of [`kiln_protocol::api`]'s answers).
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call_as(Method::GET, path, None).await
    }

    /// `method path` with `body` written as JSON, its answer read as `T`.
    pub async fn send_json<T: DeserializeOwned, B: serde::Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(|b| serde_json::to_vec(b).map(Bytes::from))
            .transpose()
            .map_err(|e| ClientError::Protocol { url: format!("{}{path}", self.base), message: e.to_string() })?;
        self.call_as(method, path, body).await
    }

    /// `DELETE path`; non-2xx is an error.
    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        let reply = self.send(Method::DELETE, path, None).await?;
        check(&reply)
    }

    /// Raw bytes (an asset); non-2xx is an error.
    pub async fn bytes(&self, path: &str) -> Result<Bytes, ClientError> {
        let reply = self.send(Method::GET, path, None).await?;
        check(&reply)?;
        Ok(reply.body)
    }

    /// Streams an asset (or any body) to `out` without holding it in memory; returns its size.
    /// A non-2xx answer is an error and leaves `out` untouched.
    pub async fn download(&self, path: &str, out: &std::path::Path) -> Result<u64, DownloadError> {
        use tokio::io::AsyncWriteExt;
        let (url, mut body) = self.open_stream(path, &[]).await?;
        let mut tmp = out.as_os_str().to_owned();
        tmp.push(".part");
        let tmp = std::path::PathBuf::from(tmp);
        let mut file = tokio::fs::File::create(&tmp).await?;
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|source| ClientError::Read { url: url.clone(), source })?;
            if let Some(data) = frame.data_ref() {
                file.write_all(data).await?;
                n += data.len() as u64;
            }
        }
        file.flush().await?;
        drop(file);
        tokio::fs::rename(&tmp, out).await?;
        Ok(n)
    }

    /// Reads a job's event stream, calling `on` with each event's name and data until it returns
    /// `false` or the stream ends.
    pub async fn follow(&self, job_id: &str, mut on: impl FnMut(&str, &Value) -> bool) -> Result<(), ClientError> {
        let path = format!("/v1/jobs/{job_id}/events");
        let (url, mut body) = self.open_stream(&path, &[("accept", "text/event-stream")]).await?;
        let mut buf = String::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|source| ClientError::Read { url: url.clone(), source })?;
            let Some(data) = frame.data_ref() else { continue };
            buf.push_str(&String::from_utf8_lossy(data));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let (mut event, mut data) = ("message", String::new());
                for line in block.lines() {
                    if let Some(e) = line.strip_prefix("event:") {
                        event = if e.trim() == "state" {
                            "state"
                        } else if e.trim() == "progress" {
                            "progress"
                        } else {
                            "other"
                        };
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.trim_start());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                let value = serde_json::from_str(&data).unwrap_or(Value::String(data));
                if !on(event, &value) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

fn error_of(status: StatusCode, body: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<kiln_protocol::api::ErrorBody>(body)
        .map(|b| b.error.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).chars().take(500).collect());
    ClientError::Status { status, message }
}

fn check(reply: &Reply) -> Result<(), ClientError> {
    if reply.status.is_success() { Ok(()) } else { Err(error_of(reply.status, &reply.body)) }
}
