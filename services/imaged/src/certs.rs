//! A cluster CA and one certificate per service identity, for mutual TLS between services and
//! for clients (`imaged certs`, `imaged dev --tls`).
//!
//! Every certificate names its identity (`catalog`, `sharing`, `admin`, `client`,
//! `region-<id>`) as its common name and as a DNS name among its subject alternative names, and
//! is also valid for `localhost` and `127.0.0.1` plus any extra host names given. Files, in the
//! output directory (mode 0700): `ca.pem` and `ca.key`, `<identity>.pem` and `<identity>.key`;
//! keys are 0600. Existing files are kept: a missing identity gets a certificate from the
//! existing CA.

use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// The identity of `imagectl` and of the tests' account calls: any certificate of the cluster
/// CA may make account calls; this one may make no service call.
pub const CLIENT: &str = "client";

#[derive(Args, Debug)]
pub struct CertsArgs {
    /// Where to write the certificates and keys.
    #[arg(long)]
    out: PathBuf,
    /// Regions of the cluster: each gets a `region-<id>` certificate.
    #[arg(long, value_delimiter = ',', default_value = "")]
    regions: Vec<String>,
    /// Extra host names (or IP addresses) of an identity's certificate, as IDENTITY=NAME
    /// (e.g. `region-ap-guangzhou=region-guangzhou`, the container's host name).
    #[arg(long = "extra-name", value_parser = parse_extra)]
    extra_names: Vec<(String, String)>,
}

fn parse_extra(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .filter(|(a, b)| !a.is_empty() && !b.is_empty())
        .ok_or_else(|| format!("expected IDENTITY=NAME, got {s:?}"))
}

/// The identities of a cluster with `regions`.
pub fn identities(regions: &[String]) -> Vec<String> {
    let mut out: Vec<String> = ["catalog", "sharing", "admin", CLIENT]
        .iter()
        .map(|s| s.to_string())
        .collect();
    out.extend(
        regions
            .iter()
            .filter(|r| !r.is_empty())
            .map(|r| format!("region-{r}")),
    );
    out
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    let identities = identities(&args.regions);
    ensure(&args.out, &identities, &args.extra_names)?;
    println!(
        "certificates for {} under {}",
        identities.join(", "),
        args.out.display()
    );
    Ok(())
}

/// The certificate and key files of `identity` under `dir`.
pub fn files(dir: &Path, identity: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{identity}.pem")),
        dir.join(format!("{identity}.key")),
    )
}

pub fn ca_file(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

fn write(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "imagefleet cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2099, 12, 31);
    Ok(params)
}

/// Makes the CA (if missing) and a certificate for every identity missing one.
pub fn ensure(dir: &Path, identities: &[String], extra: &[(String, String)]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let ca_key_path = dir.join("ca.key");
    let ca_cert_path = ca_file(dir);
    let (ca_key, fresh) = if ca_key_path.exists() && ca_cert_path.exists() {
        (
            KeyPair::from_pem(&std::fs::read_to_string(&ca_key_path)?)?,
            false,
        )
    } else {
        (KeyPair::generate()?, true)
    };
    let params = ca_params()?;
    if fresh {
        let cert = params.self_signed(&ca_key)?;
        write(&ca_key_path, &ca_key.serialize_pem(), true)?;
        write(&ca_cert_path, &cert.pem(), false)?;
    }
    let issuer = Issuer::new(params, ca_key);
    for identity in identities {
        let (cert_path, key_path) = files(dir, identity);
        if !fresh && cert_path.exists() && key_path.exists() {
            continue;
        }
        let mut names = vec![
            identity.clone(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ];
        names.extend(
            extra
                .iter()
                .filter(|(id, _)| id == identity)
                .map(|(_, name)| name.clone()),
        );
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, identity.as_str());
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2099, 12, 31);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write(&key_path, &key.serialize_pem(), true)?;
        write(&cert_path, &cert.pem(), false)?;
    }
    Ok(())
}
