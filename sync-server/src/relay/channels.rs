//! What the relay writes or reads for the customer channels (web widget, WhatsApp, email fallback).

#[allow(unused_imports)]
use super::*;

impl Relay {
    /// Web-widget customers who are offline and left an email address get crew messages by email
    /// ("Customer is offline. Email fallback activated" in the desktop app).
    pub(super) async fn queue_email_fallback(
        &self,
        doc_id: &str,
        team: &TeamId,
        added: &[crewdesk::domain::Message],
        header: &doc::DocHeader,
    ) {
        let online = self.presence_of(doc_id).is_some_and(|p| p.online);
        let email = header.customer.email.as_deref();
        if !crewdesk::domain::status::email_fallback_applies(header.channel, online, email) {
            return;
        }
        let Some(to) = header.customer.email.as_deref() else { return };
        self.queue_outbox(doc_id, team, header, added, to, None).await;
    }

    /// Crew messages in Email conversations of a team with a mailbox go out as threaded replies
    /// through the email outbox (internal notes and hand-overs never: they do not reach the customer).
    pub(super) async fn queue_email_reply(
        &self,
        doc_id: &str,
        team: &TeamId,
        added: &[crewdesk::domain::Message],
        header: &doc::DocHeader,
    ) {
        if header.channel != crewdesk::domain::Channel::Email || !added.iter().any(|m| m.reaches_customer()) {
            return;
        }
        let t = team.clone();
        if !self.blocking(move |s| Ok(s.mailboxes()?.into_iter().any(|m| m.team == t))).await.unwrap_or(false) {
            return;
        }
        let Some(to) = header.customer.email.as_deref().filter(|e| !e.trim().is_empty()) else {
            warn!(%doc_id, "an Email conversation without the customer's address: the reply is not sent");
            return;
        };
        self.queue_outbox(doc_id, team, header, added, to, Some(team)).await;
    }

    /// Queues the crew messages among `added` that reach the customer for `to` in the email outbox
    /// (each once: its row is keyed by the message) and wakes the mailer; `reply_of` names the team
    /// for a reply in an Email conversation, `None` is the web widget's fallback. Agents are named
    /// from the relay's team cache.
    async fn queue_outbox(
        &self,
        doc_id: &str,
        team: &TeamId,
        header: &doc::DocHeader,
        added: &[crewdesk::domain::Message],
        to: &str,
        reply_of: Option<&TeamId>,
    ) {
        if !added.iter().any(crewdesk::domain::Message::reaches_customer) {
            return;
        }
        let members = self.team_rules(team).await.map(|(_, members)| members).unwrap_or_default();
        let rows: Vec<crate::store::QueuedEmail> = added
            .iter()
            .filter(|m| m.reaches_customer())
            .filter_map(|m| {
                let crewdesk::domain::Author::Crew { agent } = &m.author else { return None };
                let agent_name =
                    members.iter().find(|x| &x.agent == agent).map_or_else(|| agent.to_string(), |x| x.name.clone());
                Some(crate::store::QueuedEmail {
                    message_id: format!("{doc_id}/{}", m.id),
                    doc_id: doc_id.to_owned(),
                    to: to.to_owned(),
                    customer: header.customer.name.clone(),
                    agent: agent_name,
                    text: m.body.text_content(),
                    created_at: crewdesk::domain::Timestamp::now().0,
                    attachment: email_attachment(m),
                    team: reply_of.cloned(),
                    attempts: 0,
                })
            })
            .collect();
        if rows.is_empty() {
            return;
        }
        if let Err(e) = self.blocking(move |s| s.queue_emails(&rows)).await {
            warn!(%doc_id, %e, "emails not queued");
        }
        self.mail_wake.notify_one();
    }

    /// Crew messages in WhatsApp conversations go to the Graph API through a durable outbox.
    pub(super) async fn queue_whatsapp(
        &self,
        doc_id: &str,
        stored: &Automerge,
        added: &[crewdesk::domain::Message],
        header: &doc::DocHeader,
    ) {
        if header.channel != crewdesk::domain::Channel::WhatsApp || self.config.whatsapp.is_none() {
            return;
        }
        if !added.iter().any(crewdesk::domain::Message::reaches_customer) {
            return;
        }
        let Ok(all) = doc::all_messages(stored) else { return };
        let rows = crate::whatsapp::outbound_rows(doc_id, header, added, &all);
        if let Err(e) = self.blocking(move |s| s.queue_whatsapp(&rows)).await {
            warn!(%doc_id, %e, "WhatsApp messages not queued");
        }
        self.whatsapp_wake.notify_one();
    }

    pub(crate) fn whatsapp(&self) -> Option<&crate::whatsapp::WhatsAppConfig> {
        self.config.whatsapp.as_ref()
    }

    pub(crate) fn whatsapp_inbound_lock(&self) -> &AsyncMutex<()> {
        &self.whatsapp_inbound
    }

    /// Applies a change made by the relay itself (widget customers' messages), commits it and
    /// fans it out like any other change.
    pub(crate) async fn change_as_relay<F>(&self, doc_id: &str, f: F) -> Result<(), String>
    where
        F: FnOnce(&mut automerge::transaction::Transaction<'_>) -> Result<(), doc::DocError>,
    {
        self.change_as_relay_reading(doc_id, None, f).await
    }

    /// [`Relay::change_as_relay`] for a mail taken in: its UID, Message-ID and thread are stored with
    /// the change, in one transaction.
    pub(crate) async fn change_as_relay_reading<F>(
        &self,
        doc_id: &str,
        mail: Option<crate::store::TakenMail>,
        f: F,
    ) -> Result<(), String>
    where
        F: FnOnce(&mut automerge::transaction::Transaction<'_>) -> Result<(), doc::DocError>,
    {
        let entry = self.entry(doc_id);
        let mut e = entry.lock().await;
        self.ensure_loaded(doc_id, &mut e).await.map_err(|e| e.to_string())?;
        let e = &mut *e;
        let Some(team) = e.core.team().cloned() else { return Err("no such conversation".into()) };
        let chunk = e.core.relay_change(f)?;
        if let Err(err) = self.commit_reading(doc_id, &team, chunk, mail).await {
            // Not stored: forget the in-memory change.
            e.core.unload();
            e.loaded = false;
            return Err(err);
        }
        self.widgets.changed(doc_id);
        self.advertise_now(e);
        Ok(())
    }

    /// Creates a conversation on the relay (widget customers) and announces it to the team.
    pub(crate) async fn create_as_relay(
        &self,
        new: &doc::NewConversation,
        first: &crewdesk::domain::Message,
    ) -> Result<(), String> {
        self.create_as_relay_reading(new, first, None).await
    }

    /// [`Relay::create_as_relay`] for a mail taken in, recorded in the same transaction.
    pub(crate) async fn create_as_relay_reading(
        &self,
        new: &doc::NewConversation,
        first: &crewdesk::domain::Message,
        mail: Option<crate::store::TakenMail>,
    ) -> Result<(), String> {
        let mut d = doc::create(self.actor.clone(), new).map_err(|e| e.to_string())?;
        d.transact::<_, _, doc::DocError>(|tx| doc::add_message(tx, first)).map_err(|f| f.error.to_string())?;
        self.commit_reading(new.id.as_str(), &new.team, d.save(), mail).await?;
        let entry = self.entry(new.id.as_str());
        let mut e = entry.lock().await;
        e.core.load(d, new.team.clone());
        e.loaded = true;
        self.announce_loaded(&mut e);
        Ok(())
    }

    /// A stored conversation's messages (for a widget session's history).
    pub(crate) async fn messages_of(&self, doc_id: &str) -> Result<Vec<crewdesk::domain::Message>, String> {
        let entry = self.entry(doc_id);
        let mut e = entry.lock().await;
        self.ensure_loaded(doc_id, &mut e).await.map_err(|e| e.to_string())?;
        match e.core.doc() {
            Some(d) => doc::all_messages(d).map_err(|e| e.to_string()),
            None => Err("no such conversation".into()),
        }
    }

    /// Mails one sender may have taken into a team's conversations
    /// ([`crate::email::MAILS_PER_SENDER_PER_HOUR`] an hour), across instances.
    pub(crate) async fn allow_email_from(&self, team: &TeamId, address: &str) -> bool {
        let key = format!("email:{team}:{address}");
        let local = key.clone();
        let max = crate::email::MAILS_PER_SENDER_PER_HOUR;
        self.allow_shared(key, max, 3_600_000, || self.email_senders.allow(local)).await
    }

    /// Files a widget customer may send per conversation (20 per 10 minutes), across instances.
    pub(crate) async fn allow_widget_upload(&self, doc_id: &str) -> bool {
        let key = format!("upload:{doc_id}");
        self.allow_shared(key, 20, 600_000, || self.widget_uploads.allow(doc_id.to_owned())).await
    }

    /// Conversations one address may start (`widget_starts_per_ip` per 10 minutes), across instances.
    pub(crate) async fn allow_widget_start(&self, ip: std::net::IpAddr) -> bool {
        let key = format!("start:{ip}");
        let max = self.config.widget_starts_per_ip;
        self.allow_shared(key, max, 600_000, || self.widget_starts.allow(ip)).await
    }
}

/// The file of a crew message that is one, to go with its email.
fn email_attachment(m: &crewdesk::domain::Message) -> Option<crate::store::EmailAttachment> {
    match (&m.body, m.body.blob()) {
        (crewdesk::domain::MessageBody::Attachment { file_name, mime, size, .. }, Some(hash)) => {
            Some(crate::store::EmailAttachment {
                hash: hash.as_str().to_owned(),
                file_name: file_name.clone(),
                mime: mime.clone(),
                size: *size,
            })
        }
        _ => None,
    }
}
