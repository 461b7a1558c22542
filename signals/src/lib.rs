//! Decoders for the advertising industry's consent signals:
//!
//! - IAB Europe TCF v2 TC strings ([`decode_tcf`]),
//! - IAB GPP strings with their TCF, US Privacy and US national and state
//!   sections ([`decode_gpp`]),
//! - IAB US Privacy strings ([`decode_usp`]),
//!
//! and [`decode`], which tells them apart. Decoding never panics: malformed
//! input of any kind is a [`DecodeError`] that names the field or position at
//! fault. Decoded values serialize (serde) to JSON with snake_case keys.
//!
//! Decoding checks that a string is well-formed, not that it is acceptable
//! under current policy: a TCF 2.0 string decodes, and
//! [`TcString::validate_tcf22`] says whether it meets TCF 2.2.

mod bits;
mod error;
mod gpp;
mod tcf;
mod usp;

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

pub use error::DecodeError;
pub use gpp::{GppSection, GppString, KnownChildConsents, UndecodedSection, UsSection, decode_gpp};
pub use tcf::{
    PublisherRestriction, PublisherTc, RestrictionKind, TcString, Tcf22Problem, decode_tcf,
};
pub use usp::{UsPrivacy, UspFlag, decode_usp};

/// A decoded consent signal.
///
/// Serializes as the decoded signal's object with an added `kind` member
/// (`"tcf"`, `"gpp"` or `"usp"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind")]
pub enum Signal {
    /// Boxed: a TC string is several times the size of the other variants.
    #[serde(rename = "tcf")]
    Tcf(Box<TcString>),
    #[serde(rename = "gpp")]
    Gpp(GppString),
    #[serde(rename = "usp")]
    UsPrivacy(UsPrivacy),
}

impl Signal {
    pub fn kind(&self) -> SignalKind {
        match self {
            Self::Tcf(_) => SignalKind::Tcf,
            Self::Gpp(_) => SignalKind::Gpp,
            Self::UsPrivacy(_) => SignalKind::Usp,
        }
    }
}

/// The kinds of signal this crate decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignalKind {
    /// IAB Europe TCF v2 TC string.
    Tcf,
    /// IAB Global Privacy Platform string.
    Gpp,
    /// IAB US Privacy (CCPA) string.
    Usp,
}

impl SignalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcf => "tcf",
            Self::Gpp => "gpp",
            Self::Usp => "usp",
        }
    }
}

impl fmt::Display for SignalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for SignalKind {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// A signal kind name that [`SignalKind::from_str`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown signal kind {0:?} (expected tcf, gpp or usp)")]
pub struct UnknownSignalKind(pub String);

impl FromStr for SignalKind {
    type Err = UnknownSignalKind;

    /// Accepts `tcf`, `gpp` and `usp`, any case, and the common aliases
    /// `tcfv2`, `tcfeuv2`, `uspv1`, `us_privacy` and `ccpa`.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name.to_ascii_lowercase().as_str() {
            "tcf" | "tcfv2" | "tcfeuv2" => Ok(Self::Tcf),
            "gpp" => Ok(Self::Gpp),
            "usp" | "uspv1" | "us_privacy" | "ccpa" => Ok(Self::Usp),
            _ => Err(UnknownSignalKind(name.to_owned())),
        }
    }
}

/// Decodes `input` as `kind`, or, when `kind` is `None`, as the kind it
/// looks like:
///
/// - four characters starting with a digit (`1YNN`, `1---`): US Privacy;
/// - starting with `D` (a 6-bit 3, the GPP header type) or containing `~`:
///   GPP;
/// - anything else: a TC string (which starts with `C`, a 6-bit 2).
///
/// Whitespace is not trimmed.
pub fn decode(input: &str, kind: Option<SignalKind>) -> Result<Signal, DecodeError> {
    if input.is_empty() {
        return Err(DecodeError::Empty { what: "signal" });
    }
    match kind.unwrap_or_else(|| detect(input)) {
        SignalKind::Tcf => decode_tcf(input).map(|tc| Signal::Tcf(Box::new(tc))),
        SignalKind::Gpp => decode_gpp(input).map(Signal::Gpp),
        SignalKind::Usp => decode_usp(input).map(Signal::UsPrivacy),
    }
}

/// Guesses the kind of a signal from its shape; see [`decode`].
pub fn detect(input: &str) -> SignalKind {
    let looks_like_usp =
        input.chars().count() == 4 && input.starts_with(|c: char| c.is_ascii_digit());
    if looks_like_usp {
        SignalKind::Usp
    } else if input.starts_with('D') || input.contains('~') {
        SignalKind::Gpp
    } else {
        SignalKind::Tcf
    }
}
