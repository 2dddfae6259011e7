//! TLS for servers and clients (rustls), and the identity a client certificate proves.
//!
//! A process is told its TLS material once at start (`install`), per service identity: a
//! service's server certificate is also the client certificate it presents when it calls other
//! services, so under `imaged dev` each service in the process keeps its own identity. A
//! `default` entry serves every other client of the process (accounts, health checks, tools).
//! Servers whose identity has no entry serve plaintext; clients use TLS for `https://` URLs.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// PEM material of one identity.
#[derive(Clone, Default)]
pub struct TlsSettings {
    /// The CA that issued the servers' certificates this identity calls (the cluster CA).
    pub ca_pem: String,
    /// This identity's certificate chain and key (servers need them; clients present them).
    pub cert_pem: Option<String>,
    pub key_pem: Option<String>,
    /// Servers: demand client certificates issued by this CA (mutual TLS). `None`: no client
    /// certificate is asked for.
    pub client_ca_pem: Option<String>,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("cert", &self.cert_pem.is_some())
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

impl TlsSettings {
    /// Reads the PEM files (any may be absent: `None`).
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
    ) -> std::io::Result<TlsSettings> {
        Ok(TlsSettings {
            ca_pem: ca.map(read).transpose()?.unwrap_or_default(),
            cert_pem: cert.map(read).transpose()?,
            key_pem: key.map(read).transpose()?,
            client_ca_pem: client_ca.map(read).transpose()?,
        })
    }

    /// The server side: `None` without a certificate and key.
    pub fn server_config(&self) -> Option<ServerTlsConfig> {
        let (cert, key) = (self.cert_pem.as_ref()?, self.key_pem.as_ref()?);
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(ca) = &self.client_ca_pem {
            config = config
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(false);
        }
        Some(config)
    }

    /// The client side, checking that the server's certificate is valid for `server_name`
    /// (default: the host of the URL).
    pub fn client_config(&self, server_name: Option<&str>) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new();
        if !self.ca_pem.is_empty() {
            config = config.ca_certificate(Certificate::from_pem(&self.ca_pem));
        }
        if let (Some(cert), Some(key)) = (&self.cert_pem, &self.key_pem) {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = server_name {
            config = config.domain_name(name);
        }
        config
    }
}

/// The identity whose settings serve every client without one of its own.
pub const DEFAULT: &str = "default";

static INSTALLED: RwLock<Option<HashMap<String, Arc<TlsSettings>>>> = RwLock::new(None);

/// Installs the TLS settings of `identity` (`DEFAULT` for every other client).
pub fn install(identity: &str, settings: TlsSettings) {
    INSTALLED
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(identity.to_string(), Arc::new(settings));
}

/// The settings of `identity`, if installed.
pub fn installed(identity: &str) -> Option<Arc<TlsSettings>> {
    INSTALLED
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|m| m.get(identity).cloned())
}

/// The settings a client acting as `identity` uses: its own, else the default.
pub fn for_client(identity: Option<&str>) -> Option<Arc<TlsSettings>> {
    identity.and_then(installed).or_else(|| installed(DEFAULT))
}

/// Whether the end-entity certificate `der` is issued for the service identity `identity`
/// (a DNS name among its subject alternative names). The chain was checked by the TLS layer.
pub fn certificate_names(der: &[u8], identity: &str) -> bool {
    let der = rustls_pki_types::CertificateDer::from(der);
    let Ok(cert) = webpki::EndEntityCert::try_from(&der) else {
        return false;
    };
    let Ok(name) = rustls_pki_types::ServerName::try_from(identity) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

/// The client certificate of a connection, as the server saw it.
#[derive(Clone, Debug)]
pub enum Peer {
    /// Plaintext, or TLS without a client certificate.
    NoCertificate,
    /// The end-entity certificate (DER) the client presented.
    Certificate(Arc<Vec<u8>>),
}

/// The peer of a request, from the connection information tonic puts in its extensions.
pub fn peer_of(extensions: &http::Extensions) -> Peer {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
        .and_then(|certs| certs.first().map(|c| Arc::new(c.as_ref().to_vec())))
        .map(Peer::Certificate)
        .unwrap_or(Peer::NoCertificate)
}

/// Whether the server of `identity` demands client certificates (mutual TLS).
pub fn mutual(identity: &str) -> bool {
    installed(identity).is_some_and(|s| s.client_ca_pem.is_some() && s.cert_pem.is_some())
}
