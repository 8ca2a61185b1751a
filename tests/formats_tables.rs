//! Every E4M3FN and E8M0 code against PyTorch's own decode (tests/fixtures/formats, written
//! by scripts/make_format_tables.py), and every E2M1 nibble against the spec's table (§4.2).

use dsflash::model::formats::{E2M1_TABLE, e4m3_to_f32, e8m0_to_f32};

fn table(name: &str) -> Vec<(u8, f64)> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/formats")
        .join(name);
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| {
            let mut it = l.split_whitespace();
            (
                it.next().unwrap().parse().unwrap(),
                it.next().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn all_256_e4m3fn_codes_match_torch() {
    let t = table("e4m3fn.txt");
    assert_eq!(t.len(), 256);
    for (code, want) in t {
        let got = e4m3_to_f32(code) as f64;
        if want.is_nan() {
            assert!(got.is_nan(), "code {code:#04x}: want NaN, got {got}");
        } else {
            assert_eq!(got, want, "code {code:#04x}");
            assert_eq!(
                got.is_sign_negative(),
                want.is_sign_negative(),
                "sign of code {code:#04x}"
            );
        }
    }
}

#[test]
fn all_256_e8m0_codes_match_torch() {
    for (code, want) in table("e8m0.txt") {
        let got = e8m0_to_f32(code) as f64;
        if want.is_nan() {
            assert!(got.is_nan(), "code {code}");
        } else {
            assert_eq!(got, want, "code {code}");
        }
    }
}

#[test]
fn all_16_e2m1_nibbles_match_spec_table() {
    // Spec §4.2: 0:0, 1:0.5, 2:1.0, 3:1.5, 4:2.0, 5:3.0, 6:4.0, 7:6.0, 8:-0, 9:-0.5, 10:-1.0,
    // 11:-1.5, 12:-2.0, 13:-3.0, 14:-4.0, 15:-6.0.
    let spec = [
        0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
    ];
    for (n, want) in spec.iter().enumerate() {
        assert_eq!(E2M1_TABLE[n], *want, "nibble {n}");
        assert_eq!(
            E2M1_TABLE[n].is_sign_negative(),
            n >= 8,
            "sign of nibble {n}"
        );
    }
}
