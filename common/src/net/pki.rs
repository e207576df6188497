//! The cluster's certificates: a CA made by `metatrain certs init`, the coordinator's certificate signed
//! by it, and one certificate per worker (`metatrain certs issue NAME`). The coordinator accepts only
//! workers whose certificate the CA signed; the certificate's common name is the worker's authenticated
//! name (logs, metrics label, quarantine).
//!
//! Layout of a TLS directory: `ca.crt ca.key coordinator.crt coordinator.key workers/NAME.{crt,key}` (PEM;
//! keys are written mode 0600). Keep `ca.key` on the coordinator host only.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;

/// The name every coordinator certificate carries; workers verify it against the CA.
pub const COORDINATOR_NAME: &str = "metatrain-coordinator";
/// Certificate lifetime: long enough for a campaign of runs, short enough to expire eventually.
const VALID_DAYS: i64 = 365;

fn write(path: &Path, text: &str, private: bool) -> Result<(), String> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        opts.mode(0o600);
    }
    let _ = private;
    opts.open(path).and_then(|mut f| f.write_all(text.as_bytes())).map_err(|e| format!("{}: {e}", path.display()))
}

fn read(path: &Path) -> Result<String, String> {
    super::files::read_text(path, super::files::MAX_TEXT_FILE)
}

fn validity(p: &mut CertificateParams) {
    let now = time_now();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(VALID_DAYS);
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// A worker or host name usable in a certificate and as a metrics label.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Creates `dir/ca.{crt,key}` and `dir/coordinator.{crt,key}` (the latter valid for `hosts` too).
/// Refuses to overwrite an existing CA.
pub fn init(dir: &Path, hosts: &[String]) -> Result<(), String> {
    if dir.join("ca.crt").exists() {
        return Err(format!("{} already holds a CA (ca.crt); remove it first to start over", dir.display()));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ca_key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "metatrain cluster CA");
    ca.distinguished_name = dn;
    validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key).map_err(|e| e.to_string())?;
    write(&dir.join("ca.crt"), &ca_cert.pem(), false)?;
    write(&dir.join("ca.key"), &ca_key.serialize_pem(), true)?;
    let mut names = vec![COORDINATOR_NAME.to_string()];
    names.extend(hosts.iter().cloned());
    let (crt, key) = leaf(&names, COORDINATOR_NAME, ExtendedKeyUsagePurpose::ServerAuth, &ca_cert, &ca_key)?;
    write(&dir.join("coordinator.crt"), &crt, false)?;
    write(&dir.join("coordinator.key"), &key, true)
}

fn leaf(
    names: &[String],
    common_name: &str,
    usage: ExtendedKeyUsagePurpose,
    ca: &rcgen::Certificate,
    ca_key: &KeyPair,
) -> Result<(String, String), String> {
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut p = CertificateParams::new(names.to_vec()).map_err(|e| e.to_string())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p.extended_key_usages = vec![usage];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut p);
    let cert = p.signed_by(&key, ca, ca_key).map_err(|e| e.to_string())?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Issues `dir/workers/NAME.{crt,key}` signed by the CA in `dir`; returns the two paths.
pub fn issue(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), String> {
    if !valid_name(name) {
        return Err(format!("worker name {name:?}: use 1-64 letters, digits, '-', '_' or '.'"));
    }
    let ca_key = KeyPair::from_pem(&read(&dir.join("ca.key"))?).map_err(|e| format!("ca.key: {e}"))?;
    let ca_params =
        CertificateParams::from_ca_cert_pem(&read(&dir.join("ca.crt"))?).map_err(|e| format!("ca.crt: {e}"))?;
    let ca = ca_params.self_signed(&ca_key).map_err(|e| e.to_string())?;
    let (crt, key) = leaf(&[name.to_string()], name, ExtendedKeyUsagePurpose::ClientAuth, &ca, &ca_key)?;
    let workers = dir.join("workers");
    std::fs::create_dir_all(&workers).map_err(|e| format!("{}: {e}", workers.display()))?;
    let (c, k) = (workers.join(format!("{name}.crt")), workers.join(format!("{name}.key")));
    write(&c, &crt, false)?;
    write(&k, &key, true)?;
    Ok((c, k))
}

/// The subject common name of a DER certificate.
pub fn common_name(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}
