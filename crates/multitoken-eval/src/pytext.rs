//! Python's string and number semantics that the reference scorers rely on:
//! `str.split()` / `str.strip()` whitespace, `float(s)`, `round(x, 2)`,
//! `repr(float)`, and `random.seed(0)` + `random.choice` (MMMU's fallback for an
//! answer naming no option). Each is written from Python's documented
//! behaviour so a score equals the one the Python scorer gives on the same text.

/// Whether Python's `str.isspace()` holds for `c` (Unicode White_Space plus
/// the ASCII separators `\x1c`..`\x1f`, which Python also splits on).
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `s.strip()`.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// `s.split()`: runs of whitespace separate, no empty pieces.
pub fn py_split(s: &str) -> Vec<&str> {
    s.split(is_py_space).filter(|p| !p.is_empty()).collect()
}

/// `s.strip(ch)` for one character.
pub fn py_strip_char(s: &str, ch: char) -> &str {
    s.trim_matches(ch)
}

/// `len(s)`: code points.
pub fn py_len(s: &str) -> usize {
    s.chars().count()
}

/// `float(s)` for the forms Python accepts: surrounding whitespace, a sign,
/// digits with single `_` between them, a fraction, an exponent, or
/// `inf` / `infinity` / `nan` in any case. `None` where Python raises.
pub fn py_float(s: &str) -> Option<f64> {
    let t = py_strip(s);
    let unsigned = t.strip_prefix(['+', '-']).unwrap_or(t);
    let lower = unsigned.to_ascii_lowercase();
    if matches!(lower.as_str(), "inf" | "infinity" | "nan") {
        return t
            .to_ascii_lowercase()
            .replace("infinity", "inf")
            .parse()
            .ok();
    }
    // Underscores only between digits.
    let bytes = unsigned.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'_' {
            let before = i > 0 && bytes[i - 1].is_ascii_digit();
            let after = bytes.get(i + 1).is_some_and(|n| n.is_ascii_digit());
            if !(before && after) {
                return None;
            }
        } else if !(b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-')) {
            return None;
        }
    }
    let cleaned = t.replace('_', "");
    // Rust also accepts "inf"/"nan" spellings handled above, and nothing Python rejects here
    // except forms like "1e" or "." which both reject.
    cleaned
        .parse::<f64>()
        .ok()
        .filter(|_| unsigned.bytes().any(|b| b.is_ascii_digit()))
}

/// `round(x, 2)`: the decimal nearest to `x`'s exact binary value at two
/// places, ties to even (Python rounds the exact value, so `round(2.675, 2)`
/// is 2.67 because 2.675 is stored as 2.67499...).
pub fn py_round2(x: f64) -> f64 {
    if !x.is_finite() {
        return x;
    }
    // The exact decimal expansion of an f64 ends within 1074 places.
    let exact = format!("{:.1100}", x.abs());
    let Some((int_part, frac)) = exact.split_once('.') else {
        return x;
    };
    let kept = &frac[..2];
    let rest = &frac[2..];
    let first = rest.as_bytes().first().copied().unwrap_or(b'0');
    let beyond_half = rest.bytes().skip(1).any(|b| b != b'0');
    let mut digits: Vec<u8> = format!("{int_part}{kept}").into_bytes();
    let last_even = digits.last().is_some_and(|d| (d - b'0').is_multiple_of(2));
    let round_up = first > b'5' || (first == b'5' && (beyond_half || !last_even));
    if round_up {
        let mut i = digits.len();
        loop {
            if i == 0 {
                digits.insert(0, b'1');
                break;
            }
            i -= 1;
            if digits[i] == b'9' {
                digits[i] = b'0';
            } else {
                digits[i] += 1;
                break;
            }
        }
    }
    let split = digits.len() - 2;
    let text = format!(
        "{}.{}",
        String::from_utf8_lossy(&digits[..split]),
        String::from_utf8_lossy(&digits[split..])
    );
    let value: f64 = text.parse().unwrap_or(x.abs());
    if x.is_sign_negative() {
        -value
    } else {
        value
    }
}

/// `repr(x)` / `str(x)` of a Python float: the shortest digits that read back
/// as `x`, fixed notation for exponents -4..16 (always with a `.0` when
/// whole), scientific (`1e+16`, `1.5e-05`) otherwise.
pub fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Rust's `{:e}` gives the shortest round-trip digits: d.ddde[-]N.
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if x < 0.0 { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let body = if exp >= 0 {
            let int_len = exp + 1;
            if n <= int_len {
                format!("{digits}{}.0", "0".repeat((int_len - n) as usize))
            } else {
                format!(
                    "{}.{}",
                    &digits[..int_len as usize],
                    &digits[int_len as usize..]
                )
            }
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        };
        format!("{sign}{body}")
    } else {
        let mant = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mant}e{esign}{:02}", exp.abs())
    }
}

/// Python's `random` module's generator (MT19937) with `random.seed(n)` for a
/// non-negative integer and `random.choice`, so MMMU's fallback for an answer
/// that names no option draws the letter lmms-eval draws after `random.seed(0)`.
pub struct PyRandom {
    state: [u32; 624],
    index: usize,
}

impl PyRandom {
    /// `random.seed(seed)`: the integer's 32-bit words, least significant
    /// first, through MT19937's `init_by_array` (0 is the one word 0).
    pub fn seed(seed: u64) -> Self {
        let key: Vec<u32> = if seed >> 32 == 0 {
            vec![seed as u32]
        } else {
            vec![seed as u32, (seed >> 32) as u32]
        };
        let mut mt = [0u32; 624];
        mt[0] = 19_650_218;
        for i in 1..624 {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..624.max(key.len()) {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= 624 {
                mt[0] = mt[623];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..623 {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= 624 {
                mt[0] = mt[623];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        Self {
            state: mt,
            index: 624,
        }
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for k in 0..624 {
                let y = (self.state[k] & 0x8000_0000) | (self.state[(k + 1) % 624] & 0x7fff_ffff);
                let mut v = self.state[(k + 397) % 624] ^ (y >> 1);
                if y & 1 != 0 {
                    v ^= 0x9908_b0df;
                }
                self.state[k] = v;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `random._randbelow(n)` (n ≥ 1, below 2^32): `getrandbits(n.bit_length())`
    /// until the draw is below `n`.
    pub fn below(&mut self, n: u32) -> u32 {
        if n <= 1 {
            return 0;
        }
        let k = 32 - n.leading_zeros();
        loop {
            let r = self.next_u32() >> (32 - k);
            if r < n {
                return r;
            }
        }
    }

    /// `random.choice(items)`; `None` for an empty slice (Python raises).
    pub fn choice<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            return None;
        }
        let i = self.below(items.len() as u32) as usize;
        items.get(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_whitespace_includes_the_ascii_separators() {
        assert_eq!(py_split(" a\u{1c}b\u{3000}c\t"), vec!["a", "b", "c"]);
        assert_eq!(py_strip("\u{1f} x \n"), "x");
    }

    #[test]
    fn float_parses_what_python_parses() {
        for (s, want) in [
            ("3", Some(3.0)),
            (" -1.5e3 ", Some(-1500.0)),
            ("1_000", Some(1000.0)),
            (".5", Some(0.5)),
            ("5.", Some(5.0)),
        ] {
            assert_eq!(py_float(s), want, "{s}");
        }
        for s in ["", "1__0", "_1", "abc", "1e", ".", "1,000", "0x10", "e5"] {
            assert_eq!(py_float(s), None, "{s}");
        }
        assert_eq!(py_float("-Infinity"), Some(f64::NEG_INFINITY));
        assert!(py_float("NaN").is_some_and(f64::is_nan));
    }

    #[test]
    fn round2_rounds_the_exact_binary_value_ties_to_even() {
        // Values from CPython 3.11: round(x, 2).
        for (x, want) in [
            (2.675, 2.67),
            (0.125, 0.12),
            (0.375, 0.38),
            (1.005, 1.0),
            (-2.5, -2.5),
            (5.14159, 5.14),
            (99.995, 100.0),
            (0.995, 0.99),
            (9.999, 10.0),
        ] {
            assert_eq!(py_round2(x), want, "{x}");
        }
    }

    #[test]
    fn float_repr_matches_python() {
        for (x, want) in [
            (3.0, "3.0"),
            (2.5, "2.5"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1e16, "1e+16"),
            (123456789012345.6, "123456789012345.6"),
            (-0.5, "-0.5"),
            (1.5e-7, "1.5e-07"),
            (1e22, "1e+22"),
        ] {
            assert_eq!(py_float_repr(x), want, "{x}");
        }
    }

    #[test]
    fn random_choice_draws_what_python_draws_after_seed_0() {
        // CPython 3.11: random.seed(0); [random.choice("ABCD") for _ in range(12)]
        let mut r = PyRandom::seed(0);
        let letters = ['A', 'B', 'C', 'D'];
        let got: String = (0..12)
            .filter_map(|_| r.choice(&letters).copied())
            .collect();
        assert_eq!(got, PYTHON_SEED0_ABCD);
        // random.seed(0); [random.choice("ABCDE") for _ in range(8)]
        let mut r = PyRandom::seed(0);
        let five = ['A', 'B', 'C', 'D', 'E'];
        let got: String = (0..8).filter_map(|_| r.choice(&five).copied()).collect();
        assert_eq!(got, PYTHON_SEED0_ABCDE);
    }

    const PYTHON_SEED0_ABCD: &str = "DDACDDCDCBBC";
    const PYTHON_SEED0_ABCDE: &str = "DDACEDDC";
}
