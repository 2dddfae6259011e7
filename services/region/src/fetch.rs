//! `ImportImage`: a disk file pulled from an http or https URL.
//!
//! The URL is someone else's input aimed at the region's network, so every hop is checked
//! before it is connected to: the host is resolved, and every address it resolves to must be
//! public (see [`classify`]); the connection goes to the address that was checked (no second
//! resolution a DNS answer could change in between). Redirects are followed by hand, at most
//! [`MAX_REDIRECTS`], each hop checked the same way. The whole pull is bounded by the region's
//! import timeout, and the file's size by its import limits (the inspector enforces them on
//! the bytes, whatever the server announced).
//!
//! An https hop wraps the checked connection in TLS, verifying the server's certificate for the
//! URL's host against the Mozilla roots and the region's extra CA file, if any. A redirect from
//! https to http is refused: the file would leave the protection the URL asked for.
//!
//! The call answers once the headers of the file have been read (a refusal they show is the
//! call's error, and nothing is left behind); the rest is read in the background.

use crate::error::RegionError;
use crate::import::{Outcome, Piece};
use crate::region::Region;
use anyhow::Context;
use bytes::Bytes;
use http_body_util::BodyExt;
use imagefleet_proto::region::v1::{ImportImageRequest, ImportImageResponse};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_rustls::rustls;
use tonic::{Code, Status};

/// Redirects followed at most.
pub const MAX_REDIRECTS: usize = 5;
/// Longest URL accepted.
pub const MAX_URL_LEN: usize = 2048;

const URL_REASON: &str = "InvalidParameterValue.ImageUrl";
const FORBIDDEN: &str = "InvalidParameterValue.ImageUrlForbidden";
const UNREACHABLE: &str = "FailedOperation.ImageUrlUnreachable";
const TIMEOUT: &str = "RequestTimeout.ImportTimeout";

/// What an address is, for pulling a file from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressClass {
    /// A public address.
    Public,
    /// Loopback or a private network: allowed only by configuration.
    Private,
    /// Never: unspecified, link-local (cloud metadata lives there), multicast, broadcast,
    /// reserved and documentation ranges.
    Never,
}

/// Classifies an address (IPv4-mapped and NAT64 IPv6 addresses as the IPv4 they carry).
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return classify_v4(v4);
            }
            let s = v6.segments();
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let o = v6.octets();
                return classify_v4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            if v6 == Ipv6Addr::LOCALHOST {
                AddressClass::Private
            } else if v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || s[0..6] == [0, 0, 0, 0, 0, 0]
            {
                AddressClass::Never
            } else if (s[0] & 0xfe00) == 0xfc00 {
                AddressClass::Private
            } else {
                AddressClass::Public
            }
        }
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let o = ip.octets();
    if ip.is_loopback() || ip.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) {
        AddressClass::Private
    } else if o[0] == 0
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || o[0] >= 240
        || ip.is_documentation()
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
    {
        AddressClass::Never
    } else {
        AddressClass::Public
    }
}

fn invalid_url(message: impl Into<String>) -> Status {
    imagefleet_proto::error::invalid_argument("image_url", URL_REASON, message)
}

fn forbidden(message: impl Into<String>) -> Status {
    imagefleet_proto::error::invalid_argument("image_url", FORBIDDEN, message)
}

fn unreachable(message: impl Into<String>) -> Status {
    imagefleet_proto::error::status(Code::FailedPrecondition, UNREACHABLE, message)
}

fn timed_out(timeout: Duration) -> Status {
    imagefleet_proto::error::status(
        Code::DeadlineExceeded,
        TIMEOUT,
        format!(
            "the file was not pulled within the import timeout of {}",
            humantime::format_duration(timeout)
        ),
    )
}

/// The TLS client configuration of https imports: the Mozilla roots (`webpki-roots`) and the
/// certificates of `ca_file`, a PEM file holding at least one.
pub fn tls_config(ca_file: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read the import CA file {}", path.display()))?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.with_context(|| format!("{}: not a PEM file", path.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("{}: a certificate is not usable", path.display()))?;
            added += 1;
        }
        if added == 0 {
            anyhow::bail!("{} holds no PEM certificate", path.display());
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A checked URL: http or https, with a host and no user information.
#[derive(Clone, Debug)]
struct Target {
    uri: http::Uri,
    host: String,
    port: u16,
    https: bool,
}

fn parse_url(url: &str) -> Result<Target, Status> {
    if url.len() > MAX_URL_LEN {
        return Err(invalid_url(format!(
            "image_url is over {MAX_URL_LEN} characters"
        )));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid_url("image_url holds spaces or control characters"));
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|e| invalid_url(format!("image_url is not a URL: {e}")))?;
    let scheme = uri.scheme_str().unwrap_or_default().to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return Err(invalid_url("image_url must be an http or https URL")),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| invalid_url("image_url has no host"))?;
    if authority.as_str().contains('@') {
        return Err(invalid_url("image_url must not carry user information"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return Err(invalid_url("image_url has no host"));
    }
    Ok(Target {
        https: scheme == "https",
        port: authority.port_u16().unwrap_or(default_port),
        host,
        uri,
    })
}

/// Resolves the target's host and checks every address; returns the one to connect to.
async fn checked_address(target: &Target, allow_private: bool) -> Result<SocketAddr, Status> {
    let addresses: Vec<SocketAddr> = match target.host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, target.port)],
        Err(_) => tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|e| unreachable(format!("{} does not resolve: {e}", target.host)))?
            .collect(),
    };
    if addresses.is_empty() {
        return Err(unreachable(format!("{} does not resolve", target.host)));
    }
    for address in &addresses {
        let allowed = match classify(address.ip()) {
            AddressClass::Public => true,
            AddressClass::Private => allow_private,
            AddressClass::Never => false,
        };
        if !allowed {
            return Err(forbidden(format!(
                "{} resolves to {}, which is not a public address",
                target.host,
                address.ip()
            )));
        }
    }
    Ok(addresses[0])
}

type Body = hyper::body::Incoming;
type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>;

/// Starts http/1 on a connected stream; the connection runs in the background.
async fn handshake<S>(stream: S, address: SocketAddr) -> Result<Sender, Status>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(format!("{address}: {e}")))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Connects to the checked address, in TLS for an https target (the certificate verified for
/// the target's host).
async fn connect(
    target: &Target,
    address: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Sender, Status> {
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| unreachable(format!("cannot connect to {address}: {e}")))?;
    if !target.https {
        return handshake(stream, address).await;
    }
    let name = ServerName::try_from(target.host.clone())
        .map_err(|e| invalid_url(format!("{} is not a TLS server name: {e}", target.host)))?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, stream)
        .await
        .map_err(|e| {
            let tls_error = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>());
            match tls_error {
                Some(rustls::Error::InvalidCertificate(why)) => unreachable(format!(
                    "the certificate of {} ({address}) was not trusted: {why:?}",
                    target.host
                )),
                _ => unreachable(format!("TLS with {} ({address}) failed: {e}", target.host)),
            }
        })?;
    handshake(stream, address).await
}

/// Follows the URL (and its redirects) to the file's response.
async fn open(
    url: &str,
    allow_private: bool,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<(http::Response<Body>, String), Status> {
    let mut target = parse_url(url)?;
    for _ in 0..=MAX_REDIRECTS {
        let address = checked_address(&target, allow_private).await?;
        let mut sender = connect(&target, address, tls).await?;
        let path = target
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".to_string());
        let host_header = match target.uri.authority() {
            Some(a) => a.as_str().to_string(),
            None => target.host.clone(),
        };
        let request = http::Request::get(path)
            .header(http::header::HOST, host_header)
            .header(http::header::USER_AGENT, "imagefleet-region")
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| invalid_url(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(format!("{address}: {e}")))?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(http::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| unreachable(format!("a {status} redirect without a Location")))?;
            let next = if location.starts_with('/') && !location.starts_with("//") {
                format!(
                    "{}://{}{location}",
                    target.uri.scheme_str().unwrap_or("http"),
                    target
                        .uri
                        .authority()
                        .map(|a| a.as_str())
                        .unwrap_or_default()
                )
            } else {
                location.to_string()
            };
            let next = parse_url(&next)?;
            if target.https && !next.https {
                return Err(forbidden(format!(
                    "{} redirects from https to http ({}), which is refused",
                    target.uri, next.uri
                )));
            }
            target = next;
            continue;
        }
        if !status.is_success() {
            return Err(unreachable(format!("the server answered {status}")));
        }
        return Ok((response, target.uri.to_string()));
    }
    Err(unreachable(format!("more than {MAX_REDIRECTS} redirects")))
}

/// `ImportImage`: checks, pulls the file's first bytes, answers with the `IMPORTING` image.
pub(crate) async fn import_image(
    region: &Arc<Region>,
    caller: &str,
    req: ImportImageRequest,
) -> Result<ImportImageResponse, Status> {
    let Some(params) = req.parameters.as_ref() else {
        return Err(
            RegionError::invalid("parameters", "MissingParameter", "give the parameters").into(),
        );
    };
    if req.image_url.is_empty() {
        return Err(
            RegionError::invalid("image_url", "MissingParameter", "give the image_url").into(),
        );
    }
    crate::import::check_parameters(caller, params)?;
    parse_url(&req.image_url)?;
    let limits = region.config.imports.clone();
    let deadline = Instant::now() + limits.timeout;
    let mut job = region
        .prepare_import(caller, params, None, &req.image_url)
        .await?;
    let pull = open(
        &req.image_url,
        limits.allow_private_urls,
        &region.import_tls,
    );
    let (response, _) = tokio::time::timeout_at(deadline, pull)
        .await
        .map_err(|_| timed_out(limits.timeout))??;
    job.size = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let (admitted_tx, admitted_rx) = oneshot::channel();
    let (tx, worker) = region.start_import(job, Some(admitted_tx));
    // The feeder: the body into the worker, until the end, an error or the deadline.
    tokio::spawn(async move {
        let mut body = response.into_body();
        loop {
            let piece = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => Piece::Abort(timed_out(limits.timeout)),
                Ok(None) => Piece::End,
                Ok(Some(Err(e))) => Piece::Abort(imagefleet_proto::error::status(
                    Code::Cancelled,
                    crate::import::INTERRUPTED,
                    format!("the download was interrupted: {e}"),
                )),
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => Piece::Data(data),
                    Err(_) => continue,
                },
            };
            let last = !matches!(piece, Piece::Data(_));
            if tx.send(piece).await.is_err() || last {
                return;
            }
        }
    });
    let background = region.clone();
    tokio::spawn(async move {
        let outcome = match worker.await {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Refused(Status::internal(e.to_string())),
        };
        if let Err(status) = background.conclude_import(outcome).await {
            tracing::info!(reason = ?imagefleet_proto::error::reason(&status), message = status.message(), "URL import ended without an image");
        }
    });
    match admitted_rx.await {
        Ok(Ok(image_id)) => Ok(ImportImageResponse { image_id }),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(Status::from(RegionError::Task(
            "the import ended without an answer".into(),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_classified() {
        let class = |s: &str| classify(s.parse().unwrap());
        for public in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert_eq!(class(public), AddressClass::Public, "{public}");
        }
        for private in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "::1",
            "fd00::1",
            "100.64.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert_eq!(class(private), AddressClass::Private, "{private}");
        }
        for never in [
            "0.0.0.0",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.2.1",
            "::",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert_eq!(class(never), AddressClass::Never, "{never}");
        }
    }

    #[test]
    fn ca_files_are_checked() {
        assert!(tls_config(None).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        assert!(tls_config(Some(&empty)).is_err());
        assert!(tls_config(Some(&dir.path().join("missing.pem"))).is_err());
    }

    #[test]
    fn urls_are_checked() {
        assert!(parse_url("http://example.com/a.qcow2").is_ok());
        let https = parse_url("https://example.com/a.qcow2").unwrap();
        assert!(https.https);
        assert_eq!(https.port, 443);
        assert!(!parse_url("http://example.com/a.qcow2").unwrap().https);
        assert_eq!(parse_url("http://[::1]:8080/x").unwrap().host, "::1");
        for bad in [
            "ftp://h/x",
            "ftps://h/x",
            "file:///etc/passwd",
            "http://",
            "x",
            "http://u:p@h/x",
            "http://h/a b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
