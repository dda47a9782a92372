//! One client's HTTP/1.1 connection: keep-alive, reconnect after an error, nothing shared.
//!
//! Each simulated client owns one TCP connection, so `--clients 256` means exactly 256
//! concurrent connections. The generator shares the machine with the server it measures, so
//! every microsecond it spends is taken from the server: a request is written and its answer
//! read in the client's own task, with one reused buffer each way (hyper's client connection
//! ran a task of its own per connection and handed every request and answer across a channel,
//! two task switches per request, and cost ~22 µs of the machine per request). `httparse`
//! reads the head; bodies come with `Content-Length` or chunked, as RFC 9112 allows.

use std::net::SocketAddr;
use std::task::Poll;
use std::time::{Duration, Instant};

use ::http::Method;
use anyhow::{Context, bail};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// A request that takes longer than this counts as a transport error (status 0).
const REQUEST_TIMEOUT_SECONDS: u64 = 30;
/// Header lines read from an answer at most.
const HEADERS_MAX: usize = 32;
/// Largest answer head (status line and headers) read, in bytes.
const HEAD_BYTES_MAX: usize = 64 * 1024;
/// Largest answer body read, in bytes (a seat map of a large venue is a few MB).
const BODY_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Bytes of room made in the read buffer before a read: small, since a thousand clients each
/// holding a large buffer would fault in their pages inside the timed window. A body of a
/// known length gets room for all of it at once.
const READ_BYTES: usize = 8 * 1024;
/// The longest a loopback connection is waited for in the client's own poll (it takes
/// microseconds unless the server's accept queue is full); past it the reactor waits.
const CONNECT_INLINE_MILLISECONDS: u64 = 5;
/// A connection idle this long is checked for a close by the server before it is reused.
const IDLE_CHECK_MILLISECONDS: u64 = 500;

/// Where the server listens, parsed once from `--url`.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub authority: String,
}

impl Target {
    pub async fn parse(url: &str) -> anyhow::Result<Target> {
        let Some(rest) = url.strip_prefix("http://") else { bail!("--url must start with http:// (got {url})") };
        let authority = rest.trim_end_matches('/').to_owned();
        if authority.contains('/') {
            bail!("--url must be the server's root, e.g. http://127.0.0.1:8080 (got {url})");
        }
        let addr = tokio::net::lookup_host(&authority)
            .await
            .with_context(|| format!("resolving {authority}"))?
            .next()
            .with_context(|| format!("{authority} resolves to no address"))?;
        Ok(Target { addr, authority })
    }
}

/// The answer to one request: status (0 for a transport error) and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

pub struct Conn {
    target: Target,
    stream: Option<TcpStream>,
    /// When the last answer was read (a server may close a connection left idle).
    used_at: Instant,
    /// The request being written (kept for its capacity).
    out: Vec<u8>,
    /// Bytes read and not yet consumed.
    input: BytesMut,
}

impl Conn {
    pub fn new(target: Target) -> Conn {
        Conn { target, stream: None, used_at: Instant::now(), out: Vec::with_capacity(1024), input: BytesMut::new() }
    }

    /// Sends one request; a broken connection is dropped and the next request reconnects.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
        idempotency_key: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Answer {
        let request = self.try_send(&method, path, token, idempotency_key, body.as_deref());
        let outcome = tokio::time::timeout(Duration::from_secs(REQUEST_TIMEOUT_SECONDS), request).await;
        match outcome {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) | Err(_) => {
                self.stream = None;
                Answer { status: 0, body: Bytes::new() }
            }
        }
    }

    async fn try_send(
        &mut self,
        method: &Method,
        path: &str,
        token: Option<&str>,
        idempotency_key: Option<&str>,
        body: Option<&[u8]>,
    ) -> anyhow::Result<Answer> {
        write_request(&mut self.out, method, &self.target.authority, path, token, idempotency_key, body);
        self.connect().await?;
        let stream = self.stream.as_mut().context("connection just made")?;
        stream.write_all(&self.out).await?;
        let head_only = *method == Method::HEAD;
        let (answer, keep_alive) = read_answer(stream, &mut self.input, head_only).await?;
        if !keep_alive {
            self.stream = None;
        }
        self.used_at = Instant::now();
        Ok(answer)
    }

    /// Opens the connection now if it is not open (else the first request does).
    pub async fn connect(&mut self) -> anyhow::Result<()> {
        if self.used_at.elapsed() >= Duration::from_millis(IDLE_CHECK_MILLISECONDS) && self.closed_by_server().await {
            self.stream = None;
        }
        if self.stream.is_none() {
            let stream = open(self.target.addr).await?;
            stream.set_nodelay(true)?;
            self.input.clear();
            self.stream = Some(stream);
        }
        Ok(())
    }

    /// True when the server has closed the open connection (or sent what nobody asked for): a
    /// request written to it would fail without having been read.
    async fn closed_by_server(&mut self) -> bool {
        let Some(stream) = self.stream.as_mut() else { return false };
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        // Polled once: readiness the reactor already knows of, no waiting.
        let peeked = std::future::poll_fn(|cx| Poll::Ready(stream.poll_peek(cx, &mut buf))).await;
        !matches!(peeked, Poll::Pending)
    }
}

/// Opens a connection to `addr`. On loopback the handshake completes inside `connect(2)`, so
/// it is made there and then: the client's request goes out in the same poll, as a customer's
/// browser sends its request as soon as it is connected. Awaiting the reactor instead put every
/// new connection's request behind the other clients' first polls: in a flash sale's burst of
/// a thousand, a customer who started at 5 ms sent at ~40 ms (docs/benchmarks-history.md).
async fn open(addr: SocketAddr) -> std::io::Result<TcpStream> {
    if addr.ip().is_loopback() {
        let inline = Duration::from_millis(CONNECT_INLINE_MILLISECONDS);
        if let Ok(stream) = std::net::TcpStream::connect_timeout(&addr, inline) {
            stream.set_nonblocking(true)?;
            return TcpStream::from_std(stream);
        }
    }
    TcpStream::connect(addr).await
}

/// Writes the request line, headers and body into `out` (emptied first).
fn write_request(
    out: &mut Vec<u8>,
    method: &Method,
    authority: &str,
    path: &str,
    token: Option<&str>,
    idempotency_key: Option<&str>,
    body: Option<&[u8]>,
) {
    out.clear();
    for part in [method.as_str(), " ", path, " HTTP/1.1\r\nhost: ", authority, "\r\n"] {
        out.extend_from_slice(part.as_bytes());
    }
    if let Some(token) = token {
        for part in ["authorization: Bearer ", token, "\r\n"] {
            out.extend_from_slice(part.as_bytes());
        }
    }
    if let Some(key) = idempotency_key {
        for part in ["idempotency-key: ", key, "\r\n"] {
            out.extend_from_slice(part.as_bytes());
        }
    }
    if let Some(body) = body {
        out.extend_from_slice(b"content-type: application/json\r\ncontent-length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(body);
    } else {
        out.extend_from_slice(b"\r\n");
    }
}

/// How an answer's body is delimited (RFC 9112 §6.3).
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    /// Until the server closes the connection.
    Close,
}

/// The head of an answer: status, how its body ends, and whether the connection stays open.
#[derive(Debug)]
struct Head {
    status: u16,
    framing: Framing,
    keep_alive: bool,
}

/// Parses a complete head at the start of `input`: its length and what it says; `None` while
/// more bytes are needed.
fn parse_head(input: &[u8], head_only: bool) -> anyhow::Result<Option<(usize, Head)>> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(len) = response.parse(input)? else { return Ok(None) };
    let status = response.code.context("an answer without a status")?;
    let mut keep_alive = response.version == Some(1);
    let mut framing = Framing::Close;
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or_default().trim();
        if header.name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked {
            framing = Framing::Length(value.parse().context("a malformed content-length")?);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.to_ascii_lowercase().ends_with("chunked") {
                bail!("an answer with transfer-encoding {value}");
            }
            framing = Framing::Chunked;
        } else if header.name.eq_ignore_ascii_case("connection") {
            keep_alive = !value.eq_ignore_ascii_case("close");
        }
    }
    // 1xx, 204 and 304 have no body whatever their headers say, nor has an answer to HEAD.
    if head_only || status < 200 || status == 204 || status == 304 {
        framing = Framing::Length(0);
    }
    if framing == Framing::Close {
        keep_alive = false;
    }
    Ok(Some((len, Head { status, framing, keep_alive })))
}

/// Reads more from `stream` into `input`; false at the end of the stream.
async fn fill<R: AsyncRead + Unpin>(stream: &mut R, input: &mut BytesMut) -> anyhow::Result<bool> {
    input.reserve(READ_BYTES);
    Ok(stream.read_buf(input).await? > 0)
}

/// Reads one answer (skipping any 1xx before it); also whether the connection may be reused.
async fn read_answer<R: AsyncRead + Unpin>(
    stream: &mut R,
    input: &mut BytesMut,
    head_only: bool,
) -> anyhow::Result<(Answer, bool)> {
    let head = loop {
        match parse_head(input, head_only)? {
            Some((len, head)) if head.status >= 200 => {
                input.advance(len);
                break head;
            }
            Some((len, _informational)) => input.advance(len),
            None if input.len() > HEAD_BYTES_MAX => bail!("an answer head over {HEAD_BYTES_MAX} bytes"),
            None => {
                if !fill(stream, input).await? {
                    bail!("the connection closed before an answer");
                }
            }
        }
    };
    let body = match head.framing {
        Framing::Length(len) => read_exact_body(stream, input, len).await?,
        Framing::Chunked => read_chunked(stream, input).await?,
        Framing::Close => {
            while fill(stream, input).await? {
                if input.len() > BODY_BYTES_MAX {
                    bail!("an answer body over {BODY_BYTES_MAX} bytes");
                }
            }
            input.split().freeze()
        }
    };
    Ok((Answer { status: head.status, body }, head.keep_alive))
}

async fn read_exact_body<R: AsyncRead + Unpin>(
    stream: &mut R,
    input: &mut BytesMut,
    len: usize,
) -> anyhow::Result<Bytes> {
    if len > BODY_BYTES_MAX {
        bail!("an answer body of {len} bytes, over {BODY_BYTES_MAX}");
    }
    input.reserve(len.saturating_sub(input.len()));
    while input.len() < len {
        if !fill(stream, input).await? {
            bail!("the connection closed inside an answer body");
        }
    }
    Ok(input.split_to(len).freeze())
}

/// Reads a chunked body (RFC 9112 §7.1): size lines, data, and trailers up to an empty line.
async fn read_chunked<R: AsyncRead + Unpin>(stream: &mut R, input: &mut BytesMut) -> anyhow::Result<Bytes> {
    let mut body = BytesMut::new();
    loop {
        let (size_len, size) =
            match httparse::parse_chunk_size(input).map_err(|_| anyhow::anyhow!("a bad chunk size"))? {
                httparse::Status::Complete(found) => found,
                httparse::Status::Partial => {
                    if !fill(stream, input).await? {
                        bail!("the connection closed inside a chunked body");
                    }
                    continue;
                }
            };
        let size = usize::try_from(size).context("a chunk too large")?;
        if body.len() + size > BODY_BYTES_MAX {
            bail!("an answer body over {BODY_BYTES_MAX} bytes");
        }
        input.advance(size_len);
        if size == 0 {
            return skip_trailers(stream, input).await.map(|()| body.freeze());
        }
        let data = read_exact_body(stream, input, size + 2).await?;
        if !data.ends_with(b"\r\n") {
            bail!("a chunk not followed by CRLF");
        }
        body.extend_from_slice(&data[..size]);
    }
}

/// Consumes the trailer lines after the last chunk, through the empty line that ends them.
async fn skip_trailers<R: AsyncRead + Unpin>(stream: &mut R, input: &mut BytesMut) -> anyhow::Result<()> {
    loop {
        match input.windows(2).position(|w| w == b"\r\n") {
            Some(0) => {
                input.advance(2);
                return Ok(());
            }
            Some(end) => input.advance(end + 2),
            None if input.len() > HEAD_BYTES_MAX => bail!("trailers over {HEAD_BYTES_MAX} bytes"),
            None => {
                if !fill(stream, input).await? {
                    bail!("the connection closed inside the trailers");
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Feeds `parts` to `read_answer` one write at a time, as a socket may split them.
    async fn answers(parts: &[&[u8]], count: usize) -> Vec<(u16, Vec<u8>, bool)> {
        let (mut server, mut client) = tokio::io::duplex(16);
        let owned: Vec<Vec<u8>> = parts.iter().map(|p| p.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for part in owned {
                server.write_all(&part).await.unwrap();
            }
        });
        let mut input = BytesMut::new();
        let mut out = Vec::new();
        for _ in 0..count {
            let (answer, keep_alive) = read_answer(&mut client, &mut input, false).await.unwrap();
            out.push((answer.status, answer.body.to_vec(), keep_alive));
        }
        writer.await.unwrap();
        out
    }

    #[tokio::test]
    async fn answers_are_read_by_length_and_by_chunks_across_split_reads() {
        let got = answers(
            &[
                b"HTTP/1.1 201 Created\r\ncontent-length: 5\r\n\r\nhel",
                b"loHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r",
                b"\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n",
                b"HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            ],
            4,
        )
        .await;
        assert_eq!(got[0], (201, b"hello".to_vec(), true));
        assert_eq!(got[1], (409, b"abc0123456789".to_vec(), true));
        assert_eq!(got[2], (204, Vec::new(), true), "204 has no body whatever it says");
        assert_eq!(got[3], (200, b"ok".to_vec(), false));
    }

    #[tokio::test]
    async fn a_body_without_length_runs_to_the_end_of_the_connection() {
        let got = answers(&[b"HTTP/1.1 200 OK\r\n\r\nto the ", b"end"], 1).await;
        assert_eq!(got[0], (200, b"to the end".to_vec(), false));
    }

    #[tokio::test]
    async fn a_cut_answer_is_an_error() {
        let mut input = BytesMut::new();
        let mut cut: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort";
        assert!(read_answer(&mut cut, &mut input, false).await.is_err());
        let mut garbage: &[u8] = b"NOT HTTP\r\n\r\n";
        assert!(read_answer(&mut garbage, &mut BytesMut::new(), false).await.is_err());
    }

    #[test]
    fn a_request_is_written_with_its_headers_and_body() {
        let mut out = Vec::new();
        write_request(&mut out, &Method::POST, "127.0.0.1:1", "/a", Some("t"), Some("k"), Some(b"{}"));
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "POST /a HTTP/1.1\r\nhost: 127.0.0.1:1\r\nauthorization: Bearer t\r\nidempotency-key: k\r\n\
             content-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
        );
        write_request(&mut out, &Method::GET, "h", "/healthz", None, None, None);
        assert_eq!(out, b"GET /healthz HTTP/1.1\r\nhost: h\r\n\r\n");
    }
}
