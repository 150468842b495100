//! TLS for the security tests: a certificate authority and a broker certificate made here
//! (Apache Kafka serves it from a PEM key store).

use std::path::{Path, PathBuf};

use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use openssl::x509::{X509Builder, X509Name, X509NameBuilder, X509};

/// A certificate authority made for one test; clients trust it through `pem`.
pub struct Authority {
    cert: X509,
    key: PKey<Private>,
    /// Its certificate (PEM), for `ssl.ca.location`.
    pub pem: PathBuf,
}

impl Authority {
    pub fn new(dir: &Path, name: &str) -> Self {
        let key = new_key();
        let subject = name_of(name);
        let mut b = builder(&subject, &subject, &key, 1);
        b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .unwrap(),
        )
        .unwrap();
        b.sign(&key, MessageDigest::sha256()).unwrap();
        let cert = b.build();
        let pem = dir.join(format!("{}.pem", name.replace(' ', "-")));
        std::fs::write(&pem, cert.to_pem().unwrap()).unwrap();
        Self { cert, key, pem }
    }

    /// A certificate for a broker at 127.0.0.1 (and localhost), signed by this authority:
    /// (certificate PEM, PKCS#8 key PEM).
    pub fn broker_certificate(&self) -> (Vec<u8>, Vec<u8>) {
        let key = new_key();
        let mut b = builder(self.cert.subject_name(), &name_of("localhost"), &key, 2);
        let san = SubjectAlternativeName::new()
            .ip("127.0.0.1")
            .dns("localhost")
            .build(&b.x509v3_context(Some(&self.cert), None))
            .unwrap();
        b.append_extension(san).unwrap();
        b.append_extension(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .key_encipherment()
                .build()
                .unwrap(),
        )
        .unwrap();
        b.append_extension(ExtendedKeyUsage::new().server_auth().build().unwrap())
            .unwrap();
        b.sign(&self.key, MessageDigest::sha256()).unwrap();
        (
            b.build().to_pem().unwrap(),
            key.private_key_to_pem_pkcs8().unwrap(),
        )
    }
}

/// P-256: quick to make, and every TLS stack in the test takes it.
fn new_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

fn name_of(common_name: &str) -> X509Name {
    let mut n = X509NameBuilder::new().unwrap();
    n.append_entry_by_text("CN", common_name).unwrap();
    n.build()
}

/// A certificate valid from now for two days, before its extensions and signature.
fn builder(
    issuer: &openssl::x509::X509NameRef,
    subject: &X509Name,
    key: &PKey<Private>,
    serial: u32,
) -> X509Builder {
    let mut b = X509Builder::new().unwrap();
    b.set_version(2).unwrap();
    b.set_serial_number(&BigNum::from_u32(serial).unwrap().to_asn1_integer().unwrap())
        .unwrap();
    b.set_issuer_name(issuer).unwrap();
    b.set_subject_name(subject).unwrap();
    b.set_pubkey(key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(2).unwrap())
        .unwrap();
    b
}
