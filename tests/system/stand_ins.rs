//! Stand-ins for the outside world the relay talks to: an SMTP server that keeps what it accepts, and
//! the WhatsApp Graph API.

use super::*;

/// A real (minimal) SMTP server on loopback that keeps every message it accepts.
pub struct SmtpSink {
    pub addr: SocketAddr,
    pub mails: Arc<Mutex<Vec<String>>>,
}

impl SmtpSink {
    pub async fn start() -> SmtpSink {
        SmtpSink::refusing(None).await
    }

    /// A sink that answers `550` to any recipient containing `refused` (a mailbox that does not
    /// exist), as a real server refuses for good.
    pub async fn refusing(refused: Option<&'static str>) -> SmtpSink {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mails: Arc<Mutex<Vec<String>>> = Arc::default();
        let store = mails.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let store = store.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    let _ = write.write_all(b"220 sink ready\r\n").await;
                    let mut data: Option<String> = None;
                    while let Ok(Some(line)) = lines.next_line().await {
                        if let Some(body) = data.as_mut() {
                            if line == "." {
                                store.lock().unwrap().push(std::mem::take(body));
                                data = None;
                                let _ = write.write_all(b"250 queued\r\n").await;
                            } else {
                                body.push_str(&line);
                                body.push('\n');
                            }
                            continue;
                        }
                        let verb = line.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
                        let reply: &[u8] = match verb.as_str() {
                            "EHLO" | "HELO" => b"250 sink\r\n",
                            "RCPT" if refused.is_some_and(|r| line.contains(r)) => {
                                b"550 5.1.1 no such mailbox here\r\n"
                            }
                            "DATA" => {
                                data = Some(String::new());
                                b"354 end with .\r\n"
                            }
                            "QUIT" => {
                                let _ = write.write_all(b"221 bye\r\n").await;
                                break;
                            }
                            _ => b"250 ok\r\n",
                        };
                        let _ = write.write_all(reply).await;
                    }
                });
            }
        });
        SmtpSink { addr, mails }
    }

    pub fn received(&self) -> Vec<String> {
        self.mails.lock().unwrap().clone()
    }
}

/// A media upload the Graph API stand-in received: its type and bytes.
pub type Upload = (String, Vec<u8>);

/// A stand-in for the WhatsApp Cloud API's `POST /{version}/{phone-number-id}/messages`: it checks
/// the bearer token and the payload's shape the way the Graph API does, answers like it, and keeps
/// every message it accepted.
pub struct GraphStandIn {
    /// What to configure as the API base (`http://127.0.0.1:PORT/v21.0`).
    pub base: String,
    pub accepted: Arc<Mutex<Vec<serde_json::Value>>>,
    pub refused: Arc<Mutex<Vec<String>>>,
    /// Uploaded media: (type, bytes); media ids are `media-1`, `media-2`, ... in this order.
    pub media: Arc<Mutex<Vec<Upload>>>,
    /// Media customers sent, by media id, for the relay to fetch.
    pub inbound: Arc<Mutex<HashMap<String, Upload>>>,
}

impl GraphStandIn {
    pub async fn start(phone_number_id: &str, access_token: &str) -> GraphStandIn {
        use axum::http::{HeaderMap, StatusCode};
        let accepted: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let refused: Arc<Mutex<Vec<String>>> = Arc::default();
        let media: Arc<Mutex<Vec<Upload>>> = Arc::default();
        let (ok, bad) = (accepted.clone(), refused.clone());
        let expected_auth = format!("Bearer {access_token}");
        let path = format!("/v21.0/{phone_number_id}/messages");
        let handler = move |headers: HeaderMap, body: axum::body::Bytes| {
            let (ok, bad, expected_auth) = (ok.clone(), bad.clone(), expected_auth.clone());
            async move {
                let error = |status: StatusCode, message: String| {
                    bad.lock().unwrap().push(message.clone());
                    (status, axum::Json(serde_json::json!({ "error": { "message": message, "code": 100 } })))
                };
                if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected_auth.as_str()) {
                    return error(StatusCode::UNAUTHORIZED, "Invalid OAuth access token".into());
                }
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
                    return error(StatusCode::BAD_REQUEST, "body is not JSON".into());
                };
                if let Err(e) = check_graph_message(&v) {
                    return error(StatusCode::BAD_REQUEST, e);
                }
                let n = {
                    let mut all = ok.lock().unwrap();
                    all.push(v);
                    all.len()
                };
                (
                    StatusCode::OK,
                    axum::Json(
                        serde_json::json!({ "messaging_product": "whatsapp", "messages": [{ "id": format!("wamid.standin-{n}") }] }),
                    ),
                )
            }
        };
        // `POST /{version}/{phone-number-id}/media`: multipart with messaging_product, type and file.
        let (uploads, media_auth) = (media.clone(), format!("Bearer {access_token}"));
        let media_handler = move |headers: HeaderMap, mut form: axum::extract::Multipart| {
            let (uploads, media_auth) = (uploads.clone(), media_auth.clone());
            async move {
                let refuse = |status: StatusCode, message: &str| {
                    (status, axum::Json(serde_json::json!({ "error": { "message": message, "code": 100 } })))
                };
                if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(media_auth.as_str()) {
                    return refuse(StatusCode::UNAUTHORIZED, "Invalid OAuth access token");
                }
                let mut fields: HashMap<String, Vec<u8>> = HashMap::new();
                let mut file_type = None;
                while let Ok(Some(field)) = form.next_field().await {
                    let name = field.name().unwrap_or_default().to_owned();
                    if name == "file" {
                        file_type = field.content_type().map(str::to_owned);
                    }
                    fields.insert(name, field.bytes().await.unwrap().to_vec());
                }
                let text = |k: &str| fields.get(k).map(|v| String::from_utf8_lossy(v).into_owned());
                if text("messaging_product").as_deref() != Some("whatsapp") {
                    return refuse(StatusCode::BAD_REQUEST, "messaging_product must be whatsapp");
                }
                let (Some(kind), Some(file)) = (text("type"), fields.get("file")) else {
                    return refuse(StatusCode::BAD_REQUEST, "type and file are required");
                };
                if file.is_empty() || file_type.as_deref() != Some(kind.as_str()) {
                    return refuse(StatusCode::BAD_REQUEST, "the file is empty or its type differs from type");
                }
                let n = {
                    let mut all = uploads.lock().unwrap();
                    all.push((kind, file.clone()));
                    all.len()
                };
                (StatusCode::OK, axum::Json(serde_json::json!({ "id": format!("media-{n}") })))
            }
        };
        // Customers' media: `GET /{version}/{media-id}` names a URL, which gives the file; both need the token.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inbound: Arc<Mutex<HashMap<String, Upload>>> = Arc::default();
        let auth = format!("Bearer {access_token}");
        let authorized = move |headers: &HeaderMap| {
            headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(auth.as_str())
        };
        let (files, ok_auth) = (inbound.clone(), authorized.clone());
        let media_url = move |headers: HeaderMap, axum::extract::Path(id): axum::extract::Path<String>| {
            let (files, ok_auth) = (files.clone(), ok_auth.clone());
            async move {
                let known = files.lock().unwrap().get(&id).map(|(mime, _)| mime.clone());
                match (ok_auth(&headers), known) {
                    (false, _) => (
                        StatusCode::UNAUTHORIZED,
                        axum::Json(serde_json::json!({ "error": { "message": "Invalid OAuth access token" } })),
                    ),
                    (true, None) => (
                        StatusCode::NOT_FOUND,
                        axum::Json(serde_json::json!({ "error": { "message": "no such media" } })),
                    ),
                    (true, Some(mime)) => (
                        StatusCode::OK,
                        axum::Json(
                            serde_json::json!({ "id": id, "mime_type": mime, "url": format!("http://{addr}/files/{id}") }),
                        ),
                    ),
                }
            }
        };
        let files = inbound.clone();
        let media_file = move |headers: HeaderMap, axum::extract::Path(id): axum::extract::Path<String>| {
            let (files, ok_auth) = (files.clone(), authorized.clone());
            async move {
                match (ok_auth(&headers), files.lock().unwrap().get(&id).cloned()) {
                    (true, Some((_, bytes))) => (StatusCode::OK, bytes),
                    _ => (StatusCode::NOT_FOUND, Vec::new()),
                }
            }
        };
        let app = axum::Router::new()
            .route(&path, axum::routing::post(handler))
            .route(&format!("/v21.0/{phone_number_id}/media"), axum::routing::post(media_handler))
            .route("/v21.0/{id}", axum::routing::get(media_url))
            .route("/files/{id}", axum::routing::get(media_file));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        GraphStandIn { base: format!("http://{addr}/v21.0"), accepted, refused, media, inbound }
    }

    pub fn accepted(&self) -> Vec<serde_json::Value> {
        self.accepted.lock().unwrap().clone()
    }
}

/// The Graph API's rules for a text or template message, as far as the relay uses them.
fn check_graph_message(v: &serde_json::Value) -> Result<(), String> {
    let s = |p: &str| v.pointer(p).and_then(|x| x.as_str()).ok_or_else(|| format!("{p} missing or not a string"));
    if s("/messaging_product")? != "whatsapp" {
        return Err("messaging_product must be whatsapp".into());
    }
    if !s("/to")?.bytes().all(|b| b.is_ascii_digit()) {
        return Err("to must be a phone number in international format".into());
    }
    match s("/type")? {
        "text" => {
            if s("/text/body")?.trim().is_empty() {
                return Err("text.body is empty".into());
            }
        }
        "template" => {
            s("/template/name")?;
            s("/template/language/code")?;
            for c in v.pointer("/template/components").and_then(|c| c.as_array()).ok_or("components missing")? {
                for p in c.get("parameters").and_then(|p| p.as_array()).ok_or("parameters missing")? {
                    if p.get("type").and_then(|t| t.as_str()) != Some("text") || p.get("text").is_none() {
                        return Err("template parameters must be {type: text, text}".into());
                    }
                }
            }
        }
        "image" => {
            s("/image/id")?;
        }
        "document" => {
            s("/document/id")?;
            s("/document/filename")?;
        }
        other => return Err(format!("unsupported type {other}")),
    }
    Ok(())
}

/// A real IMAP server for the email channel: Dovecot (Debian's `dovecot-imapd`, which `cargo xtask
/// test` installs) with its own configuration, a Maildir in a temporary directory and one user,
/// on a free loopback port without TLS. Stopped when dropped.
pub struct Dovecot {
    pub port: u16,
    pub user: String,
    pub password: String,
    dir: tempfile::TempDir,
    child: std::process::Child,
}

impl Dovecot {
    pub async fn start() -> Dovecot {
        Dovecot::start_with("").await
    }

    /// A Dovecot that does not offer IDLE (the relay then asks for new mail every 30 s).
    pub async fn without_idle() -> Dovecot {
        Dovecot::start_with("imap_capability = IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE LITERAL+ UIDPLUS\n").await
    }

    async fn start_with(extra: &str) -> Dovecot {
        let binary = ["/usr/sbin/dovecot", "/usr/local/sbin/dovecot"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("Dovecot is not installed: run `cargo xtask test` (it installs dovecot-imapd) or apt-get install dovecot-imapd");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["run", "state", "home"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let (user, password) = ("support@example.com".to_owned(), "mailbox-secret".to_owned());
        std::fs::write(d.join("users"), format!("{user}:{{PLAIN}}{password}\n")).unwrap();
        let port = crate::free_port();
        // Mail is stored as the unprivileged `mail` user (Dovecot refuses root).
        let home = d.join("home");
        let _ = std::process::Command::new("chown").args(["-R", "mail:mail"]).arg(&home).status();
        let _ = std::process::Command::new("chmod").args(["755"]).arg(d).status();
        let conf = format!(
            "protocols = imap\nlisten = 127.0.0.1\nbase_dir = {d}/run\nstate_dir = {d}/state\nlog_path = {d}/dovecot.log\n\
             ssl = no\ndisable_plaintext_auth = no\nauth_mechanisms = plain login\nfirst_valid_uid = 1\n\
             mail_location = maildir:{d}/home/%u/Maildir\n\
             passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN username_format=%u {d}/users\n}}\n\
             userdb {{\n  driver = static\n  args = uid=mail gid=mail home={d}/home/%u\n}}\n\
             service imap-login {{\n  inet_listener imap {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n  \
             inet_listener imaps {{\n    port = 0\n  }}\n  chroot =\n}}\nservice anvil {{\n  chroot =\n}}\n{extra}",
            d = d.display()
        );
        std::fs::write(d.join("dovecot.conf"), conf).unwrap();
        let child = std::process::Command::new(binary)
            .arg("-F")
            .arg("-c")
            .arg(d.join("dovecot.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        crate::wait_listening(port).await;
        Dovecot { port, user, password, dir, child }
    }

    /// The mailbox setting the relay is given (`sync-server team … --imap`).
    pub fn url(&self) -> String {
        format!("imap://support%40example.com@127.0.0.1:{}/INBOX?tls=none", self.port)
    }

    /// A file holding the mailbox password (`--imap-password-file`).
    pub fn password_file(&self) -> String {
        let path = self.dir.path().join("password");
        std::fs::write(&path, format!("{}\n", self.password)).unwrap();
        path.display().to_string()
    }

    /// `team`'s mailbox setting for this server (as `sync-server team TEAM --imap … --imap-password-file …`
    /// stores it), the team's address support@example.com.
    pub fn setting(&self, team: &str) -> sync_server::store::MailboxSetting {
        sync_server::store::MailboxSetting {
            team: crewdesk::domain::TeamId(team.to_owned()),
            url: self.url(),
            password_file: Some(self.password_file()),
            password_env: None,
            address: "support@example.com".into(),
            uidvalidity: 0,
            last_uid: 0,
        }
    }

    /// Delivers a mail into the mailbox, as the team's mail server would (IMAP APPEND).
    pub async fn deliver(&self, mail: &str) {
        self.deliver_at(mail, None).await
    }

    /// Delivers a mail that arrived at `internal_date` (`"03-Nov-2026 10:00:00 +0000"`).
    pub async fn deliver_at(&self, mail: &str, internal_date: Option<&str>) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        async fn until(lines: &mut tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>, start: &str) -> String {
            loop {
                let line = lines.next_line().await.unwrap().expect("the IMAP server closed the connection");
                if line.starts_with(start) {
                    return line;
                }
            }
        }
        until(&mut lines, "* OK").await;
        write.write_all(format!("a1 LOGIN \"{}\" \"{}\"\r\n", self.user, self.password).as_bytes()).await.unwrap();
        assert!(until(&mut lines, "a1 ").await.starts_with("a1 OK"));
        let bytes = mail.replace("\r\n", "\n").replace('\n', "\r\n");
        let date = internal_date.map(|d| format!(" \"{d}\"")).unwrap_or_default();
        write.write_all(format!("a2 APPEND INBOX{date} {{{}}}\r\n", bytes.len()).as_bytes()).await.unwrap();
        until(&mut lines, "+").await;
        write.write_all(bytes.as_bytes()).await.unwrap();
        write.write_all(b"\r\n").await.unwrap();
        let done = until(&mut lines, "a2 ").await;
        assert!(done.starts_with("a2 OK"), "APPEND: {done}");
        write.write_all(b"a3 LOGOUT\r\n").await.unwrap();
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        // SIGTERM: the master stops its login and IMAP processes too.
        let _ = std::process::Command::new("kill").arg(self.child.id().to_string()).status();
        if (0..50).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            matches!(self.child.try_wait(), Ok(Some(_)))
        }) {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
