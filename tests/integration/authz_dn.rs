//! The subject string QEMU's `authz-simple` compares, from `pki::qemu_authz_dn` and from the
//! GnuTLS this machine's QEMU links (`libgnutls.so.30`, loaded at run time): generated and
//! mutated names must give the same string, or a refusal on our side; never a string GnuTLS
//! would not make. `PROPTEST_CASES=N` sets how many names each property tries.

use std::ffi::{CStr, c_int, c_uint, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use qemu_tls_migrate::pki::{self, HostCert, LabCa, dn::NAMES};

#[repr(C)]
struct Datum {
    data: *mut u8,
    size: c_uint,
}

type RdnGet2 = unsafe extern "C" fn(*const Datum, *mut Datum, c_uint) -> c_int;
type CrtInit = unsafe extern "C" fn(*mut *mut c_void) -> c_int;
type CrtImport = unsafe extern "C" fn(*mut c_void, *const Datum, c_int) -> c_int;
type CrtGetDn2 = unsafe extern "C" fn(*mut c_void, *mut Datum) -> c_int;
type CrtDeinit = unsafe extern "C" fn(*mut c_void);
type Free = unsafe extern "C" fn(*mut c_void);

/// The few GnuTLS functions QEMU's authz check goes through.
struct GnuTls {
    rdn_get2: RdnGet2,
    crt_init: CrtInit,
    crt_import: CrtImport,
    crt_get_dn2: CrtGetDn2,
    crt_deinit: CrtDeinit,
    free: Free,
}

const GNUTLS_X509_DN_FLAG_COMPAT: c_uint = 1;
const GNUTLS_X509_FMT_DER: c_int = 0;

fn gnutls() -> &'static GnuTls {
    static LIB: OnceLock<GnuTls> = OnceLock::new();
    LIB.get_or_init(|| {
        // SAFETY: dlopen/dlsym with NUL-terminated names; each symbol is cast to the type the
        // GnuTLS 3.7 headers declare for it, and `gnutls_free` is a variable holding the free
        // function (gnutls.h: `extern gnutls_free_function gnutls_free`).
        unsafe {
            let lib = libc::dlopen(c"libgnutls.so.30".as_ptr(), libc::RTLD_NOW);
            assert!(
                !lib.is_null(),
                "libgnutls.so.30 (QEMU's GnuTLS) is not loadable"
            );
            let sym = |name: &CStr| {
                let p = libc::dlsym(lib, name.as_ptr());
                assert!(!p.is_null(), "GnuTLS has no {name:?}");
                p
            };
            let free_var = sym(c"gnutls_free") as *const Free;
            GnuTls {
                rdn_get2: std::mem::transmute::<*mut c_void, RdnGet2>(sym(c"gnutls_x509_rdn_get2")),
                crt_init: std::mem::transmute::<*mut c_void, CrtInit>(sym(c"gnutls_x509_crt_init")),
                crt_import: std::mem::transmute::<*mut c_void, CrtImport>(sym(
                    c"gnutls_x509_crt_import",
                )),
                crt_get_dn2: std::mem::transmute::<*mut c_void, CrtGetDn2>(sym(
                    c"gnutls_x509_crt_get_dn2",
                )),
                crt_deinit: std::mem::transmute::<*mut c_void, CrtDeinit>(sym(
                    c"gnutls_x509_crt_deinit",
                )),
                free: *free_var,
            }
        }
    })
}

/// Takes the bytes GnuTLS allocated into `out`.
fn take(g: &GnuTls, out: Datum) -> Vec<u8> {
    if out.data.is_null() {
        return Vec::new();
    }
    // SAFETY: GnuTLS filled `out` with `size` bytes it allocated; we copy and free them once.
    unsafe {
        let bytes = std::slice::from_raw_parts(out.data, out.size as usize).to_vec();
        (g.free)(out.data.cast());
        bytes
    }
}

/// What `gnutls_x509_rdn_get2(name, COMPAT)` makes of a DER `Name`: the code path of
/// `gnutls_x509_crt_get_dn`, which QEMU 7.2 calls on the client's certificate.
fn gnutls_name(der: &[u8]) -> Result<Vec<u8>, c_int> {
    let g = gnutls();
    let input = Datum {
        data: der.as_ptr().cast_mut(),
        size: der.len() as c_uint,
    };
    let mut out = Datum {
        data: std::ptr::null_mut(),
        size: 0,
    };
    // SAFETY: `input` points at `der` for the call, which only reads it; `out` is written.
    let rc = unsafe { (g.rdn_get2)(&input, &mut out, GNUTLS_X509_DN_FLAG_COMPAT) };
    if rc < 0 { Err(rc) } else { Ok(take(g, out)) }
}

/// What `gnutls_x509_crt_get_dn2` makes of a whole DER certificate (what QEMU compares).
fn gnutls_certificate(der: &[u8]) -> Result<Vec<u8>, c_int> {
    let g = gnutls();
    let input = Datum {
        data: der.as_ptr().cast_mut(),
        size: der.len() as c_uint,
    };
    let mut crt: *mut c_void = std::ptr::null_mut();
    let mut out = Datum {
        data: std::ptr::null_mut(),
        size: 0,
    };
    // SAFETY: the certificate object is made, used and freed here; `input` outlives the calls.
    unsafe {
        assert_eq!((g.crt_init)(&mut crt), 0, "gnutls_x509_crt_init");
        let mut rc = (g.crt_import)(crt, &input, GNUTLS_X509_FMT_DER);
        if rc >= 0 {
            rc = (g.crt_get_dn2)(crt, &mut out);
        }
        (g.crt_deinit)(crt);
        if rc < 0 { Err(rc) } else { Ok(take(g, out)) }
    }
}

/// How the two sides compared over one property's run.
#[derive(Default)]
struct Counts {
    agreed: AtomicU64,
    both_refused: AtomicU64,
    only_we_refused: AtomicU64,
}

/// Ours must be GnuTLS's string whenever we give one, and a refusal whenever GnuTLS fails.
fn same_as_gnutls(der: &[u8], counts: &Counts) -> Result<(), TestCaseError> {
    let ours = pki::qemu_authz_dn(der);
    let theirs = gnutls_name(der);
    let tally = match (&ours, &theirs) {
        (Ok(a), Ok(b)) => {
            prop_assert_eq!(a, &String::from_utf8_lossy(b), "name {}", hex(der));
            &counts.agreed
        }
        (Ok(a), Err(rc)) => {
            return Err(TestCaseError::fail(format!(
                "we said {a:?}, GnuTLS failed ({rc}) on {}",
                hex(der)
            )));
        }
        (Err(_), Ok(_)) => &counts.only_we_refused,
        (Err(_), Err(_)) => &counts.both_refused,
    };
    tally.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Runs the comparison on `cases` names from `strategy` (`PROPTEST_CASES`, default 256) and
/// notes the counts.
fn compare_all(what: &str, strategy: impl Strategy<Value = Vec<u8>>) {
    let mut runner = TestRunner::new(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let counts = Counts::default();
    let started = std::time::Instant::now();
    let result = runner.run(&strategy, |der| same_as_gnutls(&der, &counts));
    let total = counts.agreed.load(Ordering::Relaxed)
        + counts.both_refused.load(Ordering::Relaxed)
        + counts.only_we_refused.load(Ordering::Relaxed);
    crate::fixture::note(format_args!(
        "{what}: {total} names in {:?}: {} same string as GnuTLS, {} refused by both, {} refused only here",
        started.elapsed(),
        counts.agreed.load(Ordering::Relaxed),
        counts.both_refused.load(Ordering::Relaxed),
        counts.only_we_refused.load(Ordering::Relaxed),
    ));
    if let Err(e) = result {
        panic!("{what}: {e}");
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    match content.len() {
        n if n < 0x80 => v.push(n as u8),
        n if n < 0x100 => v.extend([0x81, n as u8]),
        n => v.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    v.extend_from_slice(content);
    v
}

fn oid_der(dotted: &str) -> Vec<u8> {
    let arcs: Vec<u64> = dotted.split('.').map(|a| a.parse().expect("arc")).collect();
    let mut out = Vec::new();
    let mut push = |mut v: u64| {
        let mut chunk = vec![(v & 0x7f) as u8];
        v >>= 7;
        while v > 0 {
            chunk.push((v & 0x7f) as u8 | 0x80);
            v >>= 7;
        }
        out.extend(chunk.iter().rev());
    };
    push(arcs[0] * 40 + arcs[1]);
    for &a in &arcs[2..] {
        push(a);
    }
    out
}

/// An attribute type: one GnuTLS knows (mostly) or any OID.
fn attribute_type() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => proptest::sample::select(NAMES).prop_map(|(oid, _, _)| oid_der(oid)),
        1 => (0u64..3, 0u64..40, proptest::collection::vec(any::<u64>(), 0..4)).prop_map(
            |(a, b, rest)| {
                let dotted = std::iter::once(a.to_string())
                    .chain(std::iter::once(b.to_string()))
                    .chain(rest.iter().map(|r| (r >> (r % 64)).to_string()))
                    .collect::<Vec<_>>()
                    .join(".");
                oid_der(&dotted)
            }
        ),
    ]
}

/// Value bytes rich in what escaping, decoding and refusing turn on.
fn value_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        4 => proptest::sample::select(b"abcXYZ019-. ".to_vec()).prop_map(|b| vec![b]),
        3 => proptest::sample::select(b",+\"\\<>;#= \n".to_vec()).prop_map(|b| vec![b]),
        1 => Just(vec![0u8]),
        1 => any::<u8>().prop_map(|b| vec![b]),
        2 => proptest::sample::select(vec!["é", "日", "ü", "😀", "\u{7f}"])
            .prop_map(|s| s.as_bytes().to_vec()),
        1 => proptest::sample::select(vec![vec![0xd8, 0x00], vec![0xdc, 0x01], vec![0x00, 0x00]]),
    ];
    prop_oneof![
        20 => proptest::collection::vec(piece, 0..12).prop_map(|v| v.concat()),
        1 => (1usize..700).prop_map(|n| vec![b'x'; n]),
    ]
}

fn string_tag() -> impl Strategy<Value = u8> {
    prop_oneof![
        proptest::sample::select(vec![
            0x0c, 0x13, 0x14, 0x16, 0x1c, 0x1e, 0x04, 0x12, 0x02, 0x05, 0x2c
        ]),
        1u8..0x1f,
    ]
}

fn attribute() -> impl Strategy<Value = Vec<u8>> {
    (attribute_type(), string_tag(), value_bytes())
        .prop_map(|(oid, tag, value)| tlv(0x30, &[tlv(0x06, &oid), tlv(tag, &value)].concat()))
}

/// A DER `Name`: up to five RDNs of one to three attributes (now and then none).
fn name() -> impl Strategy<Value = Vec<u8>> {
    let rdn = prop_oneof![
        20 => proptest::collection::vec(attribute(), 1..=3),
        1 => Just(Vec::new()),
    ];
    proptest::collection::vec(rdn, 0..=5).prop_map(|rdns| {
        let sets: Vec<u8> = rdns.iter().flat_map(|r| tlv(0x31, &r.concat())).collect();
        tlv(0x30, &sets)
    })
}

/// A name with a few bytes changed, inserted or removed.
fn mutated_name() -> impl Strategy<Value = Vec<u8>> {
    (
        name(),
        proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..4),
    )
        .prop_map(|(mut der, edits)| {
            for (at, byte, how) in edits {
                let i = at % (der.len() + 1);
                match how {
                    0 if i < der.len() => der[i] = byte,
                    1 => der.insert(i, byte),
                    _ if i < der.len() => {
                        der.remove(i);
                    }
                    _ => {}
                }
            }
            der
        })
}

#[test]
fn generated_names_read_as_gnutls_reads_them() {
    compare_all("generated names", name());
}

#[test]
fn mutated_names_read_as_gnutls_reads_them_or_are_refused() {
    compare_all("mutated names", mutated_name());
}

#[test]
fn arbitrary_bytes_never_read_as_a_name_gnutls_would_not_make() {
    compare_all(
        "arbitrary bytes",
        proptest::collection::vec(any::<u8>(), 0..64),
    );
}

/// The subjects the QEMU tests use, as certificates: our string is GnuTLS's for the whole
/// certificate too (`gnutls_x509_crt_get_dn2`, the call QEMU makes).
#[test]
fn lab_certificates_with_chosen_subjects_read_as_gnutls_reads_them() {
    let ca = LabCa::generate("Test CA").expect("ca");
    for (what, subject) in crate::fixture::authz_subjects() {
        let (pem, _) = ca
            .issue_pem(
                &HostCert::new(vec!["host-b".to_string()]).with_subject(subject.clone()),
                pki::Role::Client,
            )
            .expect("certificate");
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map(|c: rustls_pki_types::CertificateDer<'static>| c.to_vec())
            .expect("PEM");

        let ours = pki::certificate_authz_dn(&der).expect("our string");
        let theirs = gnutls_certificate(&der).expect("GnuTLS's string");

        assert_eq!(ours.as_bytes(), &theirs[..], "{what}");
    }
}
