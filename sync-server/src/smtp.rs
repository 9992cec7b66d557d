//! How the relay reaches its SMTP server: implicit TLS (`smtps://`), STARTTLS (`smtp://`, the
//! default for that scheme) or, only to this machine, plain SMTP. The password never sits in the
//! URL: it comes from a file (`--smtp-password-file`), so it shows in no process list or log.

use std::fmt;
use std::net::IpAddr;

/// How the connection to the SMTP server is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmtpSecurity {
    /// TLS from the first byte (`smtps://`, port 465 by default).
    Tls,
    /// Plain connect, then STARTTLS before anything else; a server that does not offer it is
    /// refused (`smtp://`, port 587 by default).
    StartTls,
    /// No encryption: only to a server on this machine (`smtp://localhost:25?tls=none`, or the
    /// older `HOST:PORT` form with a loopback host).
    Plain,
}

/// The SMTP setting, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmtpServer {
    pub host: String,
    pub port: u16,
    pub security: SmtpSecurity,
    /// Sign in as this user (with the password file's contents).
    pub user: Option<String>,
}

/// The SMTP password, kept out of `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct SmtpPassword(pub String);

impl fmt::Debug for SmtpPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SmtpPassword(..)")
    }
}

impl SmtpPassword {
    /// Reads the password file (one line; the trailing newline is not part of the password).
    pub fn from_file(path: &std::path::Path) -> Result<SmtpPassword, SmtpError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SmtpError(format!("cannot read the SMTP password file {}: {e}", path.display())))?;
        let password = text.trim_end_matches(['\r', '\n']);
        if password.is_empty() {
            return Err(SmtpError(format!("the SMTP password file {} is empty", path.display())));
        }
        Ok(SmtpPassword(password.to_owned()))
    }
}

/// A refused SMTP setting; the text says what to write instead.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("SMTP setting: {0}")]
pub struct SmtpError(String);

impl SmtpError {
    pub(crate) fn new(reason: &str) -> SmtpError {
        SmtpError(reason.to_owned())
    }
}

const FORMS: &str = "use smtps://USER@HOST:465 (TLS), smtp://USER@HOST:587 (STARTTLS) or, for a server on this \
                     machine only, smtp://localhost:25?tls=none";

impl SmtpServer {
    /// Parses the `smtp` setting and checks it against the password given (if any).
    pub fn parse(setting: &str, password: Option<&SmtpPassword>) -> Result<SmtpServer, SmtpError> {
        let setting = setting.trim();
        let server = match setting.split_once("://") {
            Some(_) => Self::parse_url(setting)?,
            None => Self::parse_host_port(setting)?,
        };
        if server.security == SmtpSecurity::Plain && !is_loopback(&server.host) {
            return Err(SmtpError(format!(
                "plain SMTP to {} would send customers' emails unencrypted over the network; {FORMS}",
                server.host
            )));
        }
        match (&server.user, password) {
            (Some(_), None) => Err(SmtpError(
                "a user is given but no password: put it in a file and pass --smtp-password-file \
                 (CREWDESK_SMTP_PASSWORD_FILE, or smtp_password_file in the config file)"
                    .into(),
            )),
            (None, Some(_)) => {
                Err(SmtpError(format!("a password file is given but no user; name the user in the URL: {FORMS}")))
            }
            (Some(_), Some(_)) if server.security == SmtpSecurity::Plain => {
                Err(SmtpError("a password is never sent without TLS; use smtps:// or smtp:// with STARTTLS".into()))
            }
            _ => Ok(server),
        }
    }

    /// The older form, `HOST:PORT`: plain SMTP, so a loopback host only.
    fn parse_host_port(setting: &str) -> Result<SmtpServer, SmtpError> {
        let (host, port) = setting
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_start_matches('[').trim_end_matches(']'), p.parse::<u16>().ok()?)))
            .filter(|(h, _)| !h.is_empty())
            .ok_or_else(|| SmtpError(format!("`{setting}` is not an SMTP server; {FORMS}")))?;
        Ok(SmtpServer { host: host.to_owned(), port, security: SmtpSecurity::Plain, user: None })
    }

    fn parse_url(setting: &str) -> Result<SmtpServer, SmtpError> {
        let url = url::Url::parse(setting)
            .map_err(|e| SmtpError(format!("`{setting}` is not a valid URL ({e}); {FORMS}")))?;
        let mut security = match url.scheme() {
            "smtps" => SmtpSecurity::Tls,
            "smtp" => SmtpSecurity::StartTls,
            other => return Err(SmtpError(format!("unknown scheme `{other}://`; {FORMS}"))),
        };
        if url.password().is_some() {
            return Err(SmtpError(
                "the URL holds a password, which would show in process lists and logs; put it in a file and pass \
                 --smtp-password-file instead"
                    .into(),
            ));
        }
        let host = match url.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(host) => host.to_string(),
            None => return Err(SmtpError(format!("`{setting}` names no host; {FORMS}"))),
        };
        if url.path() != "" && url.path() != "/" {
            return Err(SmtpError(format!("`{setting}` has a path, which SMTP has no use for; {FORMS}")));
        }
        for (key, value) in url.query_pairs() {
            match (key.as_ref(), value.as_ref(), security) {
                ("tls", "none", SmtpSecurity::StartTls) => security = SmtpSecurity::Plain,
                ("tls", "starttls", SmtpSecurity::StartTls) => {}
                ("tls", "implicit", _) => security = SmtpSecurity::Tls,
                ("tls", _, SmtpSecurity::Tls) => {
                    return Err(SmtpError("smtps:// is TLS from the start; drop the `tls` parameter".into()));
                }
                ("tls", other, _) => {
                    return Err(SmtpError(format!("`tls={other}`: expected tls=starttls, tls=implicit or tls=none")));
                }
                (other, ..) => return Err(SmtpError(format!("unknown parameter `{other}`; {FORMS}"))),
            }
        }
        let port = url.port().unwrap_or(match security {
            SmtpSecurity::Tls => 465,
            SmtpSecurity::StartTls => 587,
            SmtpSecurity::Plain => 25,
        });
        let user = match url.username() {
            "" => None,
            raw => Some(
                percent_encoding::percent_decode_str(raw)
                    .decode_utf8()
                    .map_err(|_| SmtpError("the user name in the URL is not UTF-8".into()))?
                    .into_owned(),
            ),
        };
        Ok(SmtpServer { host, port, security, user })
    }
}

/// `localhost` or a loopback address: plain SMTP there never crosses a network.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn password() -> SmtpPassword {
        SmtpPassword("s3cret".into())
    }

    fn server(host: &str, port: u16, security: SmtpSecurity, user: Option<&str>) -> SmtpServer {
        SmtpServer { host: host.into(), port, security, user: user.map(str::to_owned) }
    }

    #[test]
    fn tls_and_starttls_with_a_user_and_the_password_from_its_file() {
        let p = Some(password());
        assert_eq!(
            SmtpServer::parse("smtps://desk%40example.com@mail.example.com", p.as_ref()),
            Ok(server("mail.example.com", 465, SmtpSecurity::Tls, Some("desk@example.com")))
        );
        assert_eq!(
            SmtpServer::parse("smtp://desk@mail.example.com", p.as_ref()),
            Ok(server("mail.example.com", 587, SmtpSecurity::StartTls, Some("desk")))
        );
        assert_eq!(
            SmtpServer::parse("smtp://desk@mail.example.com:2587?tls=starttls", p.as_ref()),
            Ok(server("mail.example.com", 2587, SmtpSecurity::StartTls, Some("desk")))
        );
        assert_eq!(
            SmtpServer::parse("smtp://desk@mail.example.com:2465?tls=implicit", p.as_ref()),
            Ok(server("mail.example.com", 2465, SmtpSecurity::Tls, Some("desk")))
        );
        // TLS without signing in (a server that trusts the relay's address).
        assert_eq!(
            SmtpServer::parse("smtps://mail.internal:465", None),
            Ok(server("mail.internal", 465, SmtpSecurity::Tls, None))
        );
    }

    #[test]
    fn plain_smtp_only_to_this_machine_and_never_with_a_password() {
        assert_eq!(SmtpServer::parse("127.0.0.1:2525", None), Ok(server("127.0.0.1", 2525, SmtpSecurity::Plain, None)));
        assert_eq!(
            SmtpServer::parse("smtp://localhost?tls=none", None),
            Ok(server("localhost", 25, SmtpSecurity::Plain, None))
        );
        assert_eq!(SmtpServer::parse("[::1]:25", None), Ok(server("::1", 25, SmtpSecurity::Plain, None)));
        assert_eq!(
            SmtpServer::parse("smtp://[::1]:2525?tls=none", None),
            Ok(server("::1", 2525, SmtpSecurity::Plain, None))
        );
        for remote in ["mail.example.com:25", "10.0.0.5:25", "smtp://mail.example.com?tls=none"] {
            let e = SmtpServer::parse(remote, None).unwrap_err().to_string();
            assert!(e.contains("unencrypted"), "{remote}: {e}");
        }
        let e = SmtpServer::parse("smtp://desk@localhost?tls=none", Some(&password())).unwrap_err().to_string();
        assert!(e.contains("never sent without TLS"), "{e}");
    }

    #[test]
    fn refusals_say_what_to_write_instead() {
        let cases = [
            ("smtps://desk:hunter2@mail.example.com", None, "--smtp-password-file"),
            ("smtps://desk@mail.example.com", None, "no password"),
            ("smtps://mail.example.com", Some(password()), "no user"),
            ("imap://mail.example.com", None, "unknown scheme"),
            ("smtps://mail.example.com?tls=starttls", None, "drop the `tls` parameter"),
            ("smtp://mail.example.com?tls=maybe", None, "tls=starttls"),
            ("smtp://mail.example.com?verify=no", None, "unknown parameter `verify`"),
            ("smtp://mail.example.com/inbox", None, "path"),
            ("mail.example.com", None, "is not an SMTP server"),
            ("", None, "is not an SMTP server"),
        ];
        for (setting, password, says) in cases {
            let e = SmtpServer::parse(setting, password.as_ref()).unwrap_err().to_string();
            assert!(e.contains(says), "{setting}: {e}");
            assert!(!e.contains("hunter2"), "the password is not repeated: {e}");
        }
    }

    #[test]
    fn the_password_file_is_one_line_and_never_printed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("smtp-password");
        std::fs::write(&path, "correct horse\n").expect("write");
        let p = SmtpPassword::from_file(&path).expect("read");
        assert_eq!(p.0, "correct horse");
        assert_eq!(format!("{p:?}"), "SmtpPassword(..)");
        std::fs::write(&path, "\n").expect("write");
        assert!(SmtpPassword::from_file(&path).unwrap_err().to_string().contains("is empty"));
        let missing = SmtpPassword::from_file(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(missing.contains("cannot read the SMTP password file"), "{missing}");
    }
}
