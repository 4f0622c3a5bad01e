//! TPC-C (standard specification 5.11): the nine-table schema of
//! `sql/tpcc-schema.sql`, a loader, the five transactions in the standard
//! mix, and the consistency conditions of clause 3.3.2.
//!
//! The driver is a load generator for migration benchmarks, not an audited
//! TPC-C: keying and think times are off by default (`--think` turns them
//! on), and every terminal runs as fast as the server answers.

pub mod check;
pub mod driver;
pub mod load;

use clap::Args;

/// Items in the ITEM table (clause 4.3.3.1).
pub const ITEMS: u32 = 100_000;
/// Districts per warehouse.
pub const DISTRICTS: u32 = 10;
/// Customers per district.
pub const CUSTOMERS: u32 = 3_000;
/// Orders per district at load time.
pub const ORDERS: u32 = 3_000;
/// The first order that is still undelivered at load time.
pub const FIRST_NEW_ORDER: u32 = 2_101;

/// NURand's C constant for customer last names at load time, and the one
/// used while running (clause 2.1.6.1 wants them to differ by 65..=119,
/// but not 96 or 112).
pub const C_LAST_LOAD: u64 = 157;
pub const C_LAST_RUN: u64 = 223;
/// NURand's C constants for customer ids and item ids.
pub const C_ID: u64 = 259;
pub const C_ITEM: u64 = 7_911;

/// Where the database is.
#[derive(Args, Clone, Debug)]
pub struct Target {
    /// Server host (TCP).
    #[arg(long, conflicts_with = "socket")]
    pub host: Option<String>,
    /// Server port.
    #[arg(long, default_value_t = 3306)]
    pub port: u16,
    /// Server unix socket (instead of --host).
    #[arg(long)]
    pub socket: Option<String>,
    /// User.
    #[arg(long, default_value = "root")]
    pub user: String,
    /// Password.
    #[arg(long)]
    pub password: Option<String>,
    /// Database.
    #[arg(long, default_value = "tpcc")]
    pub db: String,
}

impl Target {
    /// Connection options, with or without the database selected.
    pub fn opts(&self, with_db: bool) -> mysql_async::Opts {
        let mut b = mysql_async::OptsBuilder::default()
            .user(Some(self.user.clone()))
            .pass(self.password.clone())
            .tcp_port(self.port)
            .socket(self.socket.clone())
            .prefer_socket(self.socket.is_some());
        if let Some(h) = &self.host {
            b = b.ip_or_hostname(h.clone());
        }
        if with_db {
            b = b.db_name(Some(self.db.clone()));
        }
        b.into()
    }

    /// Where, for error messages.
    pub fn describe(&self) -> String {
        match (&self.socket, &self.host) {
            (Some(s), _) => format!("socket {s}"),
            (None, Some(h)) => format!("{h}:{}", self.port),
            (None, None) => format!("localhost:{}", self.port),
        }
    }
}

/// The driver's and loader's random numbers (splitmix64: small, fast, and
/// reproducible from a seed; not for anything secret).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        debug_assert!(lo <= hi);
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn index(&mut self, n: usize) -> usize {
        // usize is at most 64 bits wide, so the remainder always fits.
        usize::try_from(self.next_u64() % n as u64).unwrap_or(0)
    }

    /// [`Rng::range`] for `u32`.
    pub fn range32(&mut self, lo: u32, hi: u32) -> u32 {
        u32::try_from(self.range(u64::from(lo), u64::from(hi))).unwrap_or(hi)
    }

    /// NURand(A, x, y) with constant `c` (clause 2.1.6).
    pub fn nurand(&mut self, a: u64, c: u64, x: u64, y: u64) -> u64 {
        (((self.range(0, a) | self.range(x, y)) + c) % (y - x + 1)) + x
    }

    /// Random alphanumeric string of `lo..=hi` characters.
    pub fn astring(&mut self, lo: usize, hi: usize) -> String {
        const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        let n = lo + self.index(hi - lo + 1);
        (0..n)
            .map(|_| CHARS[self.index(CHARS.len())] as char)
            .collect()
    }

    /// Random string of `n` digits.
    pub fn nstring(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| char::from(b"0123456789"[self.index(10)]))
            .collect()
    }

    /// I_DATA / S_DATA: 26..=50 characters, 10% containing "ORIGINAL".
    pub fn data_with_original(&mut self) -> String {
        let mut s = self.astring(26, 50);
        if self.range(1, 10) == 1 {
            let at = self.index(s.len() - 7);
            s.replace_range(at..at + 8, "ORIGINAL");
        }
        s
    }

    /// A zip code: four random digits and "11111".
    pub fn zip(&mut self) -> String {
        self.nstring(4) + "11111"
    }
}

/// Customer last name for a number in 0..=999 (clause 4.3.2.3).
pub fn last_name(n: u64) -> String {
    const SYL: [&str; 10] = [
        "BAR", "OUGHT", "ABLE", "PRI", "PRES", "ESE", "ANTI", "CALLY", "ATION", "EING",
    ];
    let digits = format!("{:03}", n % 1000);
    digits.bytes().map(|d| SYL[usize::from(d - b'0')]).collect()
}

/// An amount in cents as a SQL DECIMAL literal (amounts travel as text so
/// that no binary floating point rounds them).
pub fn cents(c: u64) -> String {
    format!("{}.{:02}", c / 100, c % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_names_from_syllables() {
        assert_eq!(last_name(0), "BARBARBAR");
        assert_eq!(last_name(371), "PRICALLYOUGHT");
        assert_eq!(last_name(999), "EINGEINGEING");
    }

    #[test]
    fn random_values_stay_in_range() {
        let mut r = Rng::new(7);
        for _ in 0..10_000 {
            let v = r.nurand(1023, C_ID, 1, 3000);
            assert!((1..=3000).contains(&v));
            let v = r.range(5, 15);
            assert!((5..=15).contains(&v));
            let s = r.astring(8, 16);
            assert!((8..=16).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric()));
            let d = r.data_with_original();
            assert!((26..=50).contains(&d.len()));
        }
        assert_eq!(r.zip().len(), 9);
        assert!(r.zip().ends_with("11111"));
    }

    #[test]
    fn original_in_about_a_tenth() {
        let mut r = Rng::new(1);
        let n = (0..10_000)
            .filter(|_| r.data_with_original().contains("ORIGINAL"))
            .count();
        assert!((800..1200).contains(&n), "{n}");
    }

    #[test]
    fn same_seed_same_numbers() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        assert!((0..100).all(|_| a.next_u64() == b.next_u64()));
    }

    #[test]
    fn amounts_as_decimal_text() {
        assert_eq!(cents(0), "0.00");
        assert_eq!(cents(5), "0.05");
        assert_eq!(cents(123_456), "1234.56");
    }
}
