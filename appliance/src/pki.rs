//! A small deployment PKI for `dev-env` and tests: one CA, appliance and hospital leaves,
//! and a rogue CA whose client certificate every listener must refuse.
//!
//! Keys are EC P-256, made by rcgen on aws-lc-rs. Certificates are valid from yesterday for
//! two years; real deployments bring their own PKI.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate authority able to sign leaves.
#[derive(Debug)]
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// A leaf certificate with its private key, both PEM.
#[derive(Debug)]
pub struct Leaf {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// PKCS#8 private key, PEM.
    pub key_pem: String,
}

/// What a leaf is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafKind {
    /// An appliance: server and client authentication, names `localhost` and `127.0.0.1`.
    Appliance,
    /// A hospital client: client authentication only.
    Client,
}

fn validity(params: &mut CertificateParams) {
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    params.not_before = (now - day).into();
    params.not_after = (now + 730 * day).into();
}

impl Authority {
    /// Makes a new self-signed CA named `common_name`.
    pub fn new(common_name: &str) -> Result<Authority, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "baylink deployment");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params);
        let cert = params.self_signed(&key)?;
        Ok(Authority {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a leaf whose subject common name is `common_name`.
    pub fn issue(&self, common_name: &str, kind: LeafKind) -> Result<Leaf, rcgen::Error> {
        let key = KeyPair::generate()?;
        let cert_pem = self.certify(common_name, kind, &key)?;
        Ok(Leaf {
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a certificate (PEM) for a key held elsewhere (an HSM), given its DER
    /// SubjectPublicKeyInfo.
    pub fn issue_for(
        &self,
        common_name: &str,
        kind: LeafKind,
        spki_der: &[u8],
    ) -> Result<String, rcgen::Error> {
        let public = rcgen::SubjectPublicKeyInfo::from_der(spki_der)?;
        self.certify(common_name, kind, &public)
    }

    fn certify(
        &self,
        common_name: &str,
        kind: LeafKind,
        key: &impl rcgen::PublicKeyData,
    ) -> Result<String, rcgen::Error> {
        let names = match kind {
            LeafKind::Appliance => vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            LeafKind::Client => Vec::new(),
        };
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match kind {
            LeafKind::Appliance => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            LeafKind::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let cert = params.signed_by(key, &self.issuer)?;
        Ok(cert.pem())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_chain_to_their_authority() {
        let ca = Authority::new("test CA").unwrap();
        let leaf = ca.issue("hospital-a", LeafKind::Client).unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(leaf.key_pem.contains("PRIVATE KEY"));
    }

    #[test]
    fn a_certificate_for_a_key_held_elsewhere_carries_that_key() {
        use rcgen::PublicKeyData as _;
        let ca = Authority::new("test CA").unwrap();
        let key = KeyPair::generate().unwrap();
        let spki = key.subject_public_key_info();
        let pem = ca.issue_for("edge", LeafKind::Appliance, &spki).unwrap();
        use rustls_pki_types::pem::PemObject as _;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        // The identity check compares the certificate's public key with the key's.
        let private = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        baylink_net::transport::TlsIdentity::from_private_key_der(vec![der.clone()], private)
            .unwrap();
        let other = KeyPair::generate().unwrap();
        let other = rustls_pki_types::PrivateKeyDer::Pkcs8(other.serialize_der().into());
        assert!(
            baylink_net::transport::TlsIdentity::from_private_key_der(vec![der], other).is_err()
        );
    }
}
