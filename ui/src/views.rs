//! The desk's components. Text from customers and agents is only ever rendered as text (yew
//! escapes it); nothing here interprets a message as HTML.

use crate::api::call;
use crate::{Action, DeskHandle, run_command};
use crewdesk::desk::{DetailView, RowView, format_waiting};
use crewdesk::domain::access::{GrabState, JoinKind};
use crewdesk::domain::filter::{Selection, Sort, View};
use crewdesk::domain::status::Status;
use crewdesk::domain::{Author, Channel, CustomerEdit, MessageBody, TeamMode};
use serde::Serialize;
use wasm_bindgen::JsCast;
use yew::prelude::*;

#[derive(Properties, PartialEq)]
pub struct DeskProps {
    pub desk: DeskHandle,
}

fn channel_icon(c: Channel) -> &'static str {
    match c {
        Channel::WebWidget => "🌐",
        Channel::WhatsApp => "🟢",
        Channel::Email => "✉️",
    }
}

fn badge_class(s: Status) -> &'static str {
    match s {
        Status::Online => "badge online",
        Status::Overdue => "badge overdue",
        Status::SoonToBe => "badge soon",
        Status::RepNeeded => "badge rep-needed",
        Status::Pending => "badge pending",
        Status::Closed => "badge closed",
    }
}

// ---- sign in ----------------------------------------------------------------------------------

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SignInArgs {
    relay_url: String,
    token: String,
}

#[function_component(SignIn)]
pub fn sign_in(props: &DeskProps) -> Html {
    let url = use_state(|| "http://127.0.0.1:3030".to_owned());
    let token = use_state(String::new);
    let busy = use_state(|| false);
    let error = use_state(|| None::<String>);
    let submit = {
        let (url, token, busy, error, desk) =
            (url.clone(), token.clone(), busy.clone(), error.clone(), props.desk.clone());
        Callback::from(move |e: SubmitEvent| {
            e.prevent_default();
            let args = SignInArgs { relay_url: (*url).clone(), token: (*token).clone() };
            let (busy, error, desk) = (busy.clone(), error.clone(), desk.clone());
            busy.set(true);
            wasm_bindgen_futures::spawn_local(async move {
                match call::<_, crewdesk::desk::SessionView>("sign_in", &args).await {
                    Ok(s) => {
                        desk.dispatch(Action::Session(Box::new(s)));
                        desk.dispatch(Action::Changed(Vec::new()));
                    }
                    Err(e) => error.set(Some(e)),
                }
                busy.set(false);
            });
        })
    };
    let on_url = {
        let url = url.clone();
        Callback::from(move |e: InputEvent| url.set(input_value(&e)))
    };
    let on_token = {
        let token = token.clone();
        Callback::from(move |e: InputEvent| token.set(input_value(&e)))
    };
    html! {
        <main class="sign-in">
            <form onsubmit={submit}>
                <h1>{ "Crewdesk" }</h1>
                <p class="muted">{ "Connect to your team's relay. Your admin gives you its address and your token." }</p>
                <label>{ "Relay address" }<input id="relay-url" value={(*url).clone()} oninput={on_url} required=true /></label>
                <label>{ "Token" }<input id="token" type="password" value={(*token).clone()} oninput={on_token} required=true /></label>
                if let Some(e) = &*error { <p class="error" role="alert">{ e }</p> }
                <button class="primary" type="submit" disabled={*busy}>{ if *busy { "Connecting…" } else { "Sign in" } }</button>
            </form>
        </main>
    }
}

pub fn input_value(e: &InputEvent) -> String {
    e.target()
        .and_then(|t| {
            t.dyn_into::<web_sys::HtmlInputElement>().ok().map(|i| i.value()).or_else(|| {
                e.target().and_then(|t| t.dyn_into::<web_sys::HtmlTextAreaElement>().ok().map(|i| i.value()))
            })
        })
        .unwrap_or_default()
}

// ---- red block --------------------------------------------------------------------------------

#[function_component(Sidebar)]
pub fn sidebar(props: &DeskProps) -> Html {
    let desk = &props.desk;
    let counts = desk.list.as_ref().map(|l| l.counts.clone()).unwrap_or_default();
    let entry = |sel: Selection, label: &str, count: usize, id: &str| {
        let d = desk.clone();
        let active = desk.filter.selection == sel;
        html! {
            <button id={id.to_owned()} class={classes!("entry", active.then_some("active"))}
                onclick={Callback::from(move |_| d.dispatch(Action::Select(sel)))}>
                <span>{ label.to_owned() }</span><span class="count">{ count }</span>
            </button>
        }
    };
    let team_entry = |team: Option<crewdesk::domain::TeamId>, label: String, count: usize, extra: &str| {
        let d = desk.clone();
        let active = desk.filter.team == team;
        let t = team.clone();
        html! {
            <button class={classes!("entry", active.then_some("active"))}
                onclick={Callback::from(move |_| d.dispatch(Action::Team(t.clone())))}>
                <span>{ label }<small class="muted">{ extra.to_owned() }</small></span><span class="count">{ count }</span>
            </button>
        }
    };
    let agent = desk.session.agent.as_ref().map(|a| a.name.clone()).unwrap_or_default();
    html! {
        <nav class="sidebar" aria-label="Filters">
            <div class="brand">
                <strong>{ "Crewdesk" }</strong>
                <SyncBadge desk={desk.clone()} />
            </div>
            <div class="who muted">{ agent }</div>
            { for desk.session.token_kept.iter().map(|kept| {
                let (class, label) = match kept.in_keyring {
                    true => ("who muted", "Token in the system keyring"),
                    false => ("who warning", "Token in a file: no system keyring"),
                };
                html! { <div id="token-kept" class={class} title={kept.note.clone()}>{ label }</div> }
            }) }
            <h2>{ "Views" }</h2>
            { entry(Selection::View(View::AllChatroom), "All Chatroom", counts.all_chatroom, "view-all") }
            { entry(Selection::View(View::Joined), "Joined", counts.joined, "view-joined") }
            <h2>{ "Teams" }</h2>
            { team_entry(None, "All teams".into(), counts.all_chatroom_all_teams(), "") }
            { for desk.session.teams.iter().map(|t| {
                let extra = match (t.mode, t.role) {
                    (TeamMode::Grab, crewdesk::domain::Role::Admin) => " · grab · admin",
                    (TeamMode::Grab, _) => " · grab",
                    (_, crewdesk::domain::Role::Admin) => " · admin",
                    _ => "",
                };
                let entry = team_entry(Some(t.id.clone()), t.name.clone(), counts.teams.get(&t.id).copied().unwrap_or(0), extra);
                match t.role {
                    crewdesk::domain::Role::Admin => {
                        let (d, team) = (desk.clone(), t.id.clone());
                        let edit = Callback::from(move |_| d.dispatch(Action::EditTemplates(Some(team.clone()))));
                        html! {
                            <div class="team-row">
                                { entry }
                                <button class="icon" id={format!("templates-{}", t.id.as_str())} onclick={edit}
                                    title={format!("Message templates of {}", t.name)} aria-label={format!("Message templates of {}", t.name)}>{ "📃" }</button>
                            </div>
                        }
                    }
                    _ => entry,
                }
            }) }
            <h2>{ "Status" }</h2>
            { for Status::ALL.iter().map(|s| entry(Selection::Status(*s), s.label(), counts.of_status(*s), &format!("status-{}", status_id(*s)))) }
            <Notifications desk={desk.clone()} />
        </nav>
    }
}

pub fn status_id(s: Status) -> &'static str {
    match s {
        Status::Online => "online",
        Status::Overdue => "overdue",
        Status::SoonToBe => "soon",
        Status::RepNeeded => "rep-needed",
        Status::Pending => "pending",
        Status::Closed => "closed",
    }
}

trait AllTeams {
    fn all_chatroom_all_teams(&self) -> usize;
}

impl AllTeams for crewdesk::domain::filter::Counts {
    fn all_chatroom_all_teams(&self) -> usize {
        self.teams.values().sum()
    }
}

#[function_component(SyncBadge)]
fn sync_badge(props: &DeskProps) -> Html {
    let s = &props.desk.sync;
    let (class, mut text) = match (s.connected, s.unsynced_changes) {
        (true, 0) => ("sync online", "Online · synced".to_owned()),
        (true, n) => ("sync online", format!("Online · syncing {n}")),
        (false, 0) => ("sync offline", "Offline".to_owned()),
        (false, n) => ("sync offline", format!("Offline · {n} not synced")),
    };
    if s.connected && s.checking > 0 {
        text.push_str(&format!(" · checking {} conversations", s.checking));
    }
    match s.pending_uploads {
        0 => {}
        1 => text.push_str(" · 1 file to upload"),
        n => text.push_str(&format!(" · {n} files to upload")),
    }
    if s.signed_out {
        // The token was revoked: nothing syncs any more until the agent signs in again.
        let d = props.desk.clone();
        let sign_out = Callback::from(move |_| {
            let d = d.clone();
            wasm_bindgen_futures::spawn_local(async move {
                match call::<_, crewdesk::desk::SessionView>("sign_out", &crate::api::NoArgs {}).await {
                    Ok(s) => d.dispatch(Action::Session(Box::new(s))),
                    Err(e) => d.dispatch(Action::Error(Some(e))),
                }
            });
        });
        return html! {
            <span id="sync-state" class="sync signed-out" role="alert">
                { "Signed out: this desk's token was revoked. " }
                <button class="link" id="sign-in-again" onclick={sign_out}>{ "Sign in again" }</button>
            </span>
        };
    }
    html! { <span id="sync-state" class={class} title={s.last_error.clone().unwrap_or_default()}>{ text }</span> }
}

#[function_component(Notifications)]
fn notifications(props: &DeskProps) -> Html {
    let desk = &props.desk;
    if desk.notifications.is_empty() {
        return html! { <section class="notifications"><h2>{ "Notifications" }</h2><p class="muted small">{ "Nothing to grab." }</p></section> };
    }
    html! {
        <section class="notifications" aria-label="Notifications">
            <h2>{ "Notifications" }<span class="count">{ desk.notifications.len() }</span></h2>
            { for desk.notifications.iter().map(|n| {
                let id = n.row.summary.id.0.clone();
                let d = desk.clone();
                let open = { let (d, id) = (desk.clone(), id.clone()); Callback::from(move |_| d.dispatch(Action::Open(id.clone()))) };
                let action = match n.grab {
                    GrabState::AwaitingConfirmation => html! { <span class="note-state awaiting">{ "Awaiting confirmation" }</span> },
                    GrabState::Lost => html! { <span class="note-state lost">{ "Taken by another representative" }</span> },
                    GrabState::Won => html! { <span class="note-state won">{ "Yours" }</span> },
                    GrabState::None if n.may_grab => html! {
                        <button class="grab" onclick={Callback::from(move |e: MouseEvent| { e.stop_propagation(); run_command(&d, "grab", OwnedId { id: id.clone() }) })}>{ "GRAB" }</button>
                    },
                    GrabState::None => html! {},
                };
                html! {
                    <div class="note" onclick={open} data-id={n.row.summary.id.0.clone()}>
                        <div class="note-main">
                            <span>{ channel_icon(n.row.summary.channel) }{ " " }{ n.row.summary.customer.name.clone() }</span>
                            <small class="muted">{ n.row.team_name.clone() }{ n.row.waiting_ms.map(|w| format!(" · waiting {}", format_waiting(w))).unwrap_or_default() }</small>
                        </div>
                        { action }
                    </div>
                }
            }) }
        </section>
    }
}

/// Owned id arguments for commands run in the background.
#[derive(Serialize)]
pub struct OwnedId {
    id: String,
}

#[derive(Serialize)]
struct TransferArgs {
    id: String,
    to: String,
}

// ---- yellow block -----------------------------------------------------------------------------

#[function_component(ListPane)]
pub fn list_pane(props: &DeskProps) -> Html {
    let desk = &props.desk;
    let rows: Vec<RowView> = desk.list.as_ref().map(|l| l.rows.clone()).unwrap_or_default();
    let (offset, total) = desk.list.as_ref().map_or((0, 0), |l| (l.offset, l.total));
    let list_ref = use_node_ref();
    // The list is a window over every row: spacers stand for the rows not loaded, and scrolling
    // near an edge of the window asks for the rows around what is on screen.
    let on_scroll = {
        let (d, list_ref, len) = (desk.clone(), list_ref.clone(), rows.len());
        Callback::from(move |_: Event| {
            let Some(el) = list_ref.cast::<web_sys::Element>() else { return };
            let first = (el.scroll_top().max(0) as usize) / ROW_HEIGHT;
            let visible = (el.client_height().max(0) as usize) / ROW_HEIGHT + 1;
            let margin = crate::PAGE / 8;
            let below = first < offset + margin && offset > 0;
            let above = first + visible + margin > offset + len && offset + len < total;
            if below || above {
                d.dispatch(Action::Window(first.saturating_sub(crate::PAGE / 2)));
            }
        })
    };
    {
        // The row under the keyboard cursor stays in view.
        let (list_ref, cursor) = (list_ref.clone(), desk.cursor);
        use_effect_with(cursor, move |cursor| {
            if let Some(el) = list_ref.cast::<web_sys::Element>() {
                let (top, height) = ((*cursor * ROW_HEIGHT) as i32, el.client_height());
                if top < el.scroll_top() {
                    el.set_scroll_top(top);
                } else if top + ROW_HEIGHT as i32 > el.scroll_top() + height {
                    el.set_scroll_top(top + ROW_HEIGHT as i32 - height);
                }
            }
            || ()
        });
    }
    let on_search = {
        let d = desk.clone();
        Callback::from(move |e: InputEvent| d.dispatch(Action::Search(input_value(&e))))
    };
    let on_key = {
        let (d, rows) = (desk.clone(), rows.clone());
        Callback::from(move |e: KeyboardEvent| match e.key().as_str() {
            "ArrowDown" | "j" => {
                e.prevent_default();
                d.dispatch(Action::Move(1));
            }
            "ArrowUp" | "k" => {
                e.prevent_default();
                d.dispatch(Action::Move(-1));
            }
            "Enter" | "o" => {
                let offset = d.list.as_ref().map_or(0, |l| l.offset);
                if let Some(r) = d.cursor.checked_sub(offset).and_then(|i| rows.get(i)) {
                    d.dispatch(Action::Open(r.summary.id.0.clone()));
                }
            }
            "r" | "c" => {
                e.prevent_default();
                focus("composer");
            }
            "/" => {
                e.prevent_default();
                focus("search");
            }
            _ => {}
        })
    };
    let title = match desk.filter.selection {
        Selection::View(View::AllChatroom) => "All Chatroom".to_owned(),
        Selection::View(View::Joined) => "Joined".to_owned(),
        Selection::Status(s) => s.label().to_owned(),
    };
    let sort = desk.filter.sort;
    let toggle_sort = {
        let d = desk.clone();
        Callback::from(move |_| {
            d.dispatch(Action::Sort(if sort == Sort::NewestActivity {
                Sort::LongestWaiting
            } else {
                Sort::NewestActivity
            }))
        })
    };
    html! {
        <section class="list-pane" aria-label="Conversations">
            <header class="list-head">
                <input id="search" class="search" type="search" placeholder="Search name, email, phone, messages  ( / )"
                    value={desk.search.clone()} oninput={on_search} />
                <div class="list-title">
                    <strong>{ title }</strong>
                    <span class="muted small">{ desk.list.as_ref().map(|l| format!("{} conversations", l.total)).unwrap_or_default() }</span>
                    <button class="link small" onclick={toggle_sort}>{ if sort == Sort::NewestActivity { "Newest first" } else { "Longest waiting first" } }</button>
                </div>
                <div class="channels" role="group" aria-label="Channels">
                    { for Channel::ALL.iter().map(|c| {
                        let d = desk.clone();
                        let c = *c;
                        let on = desk.filter.channels.is_empty() || desk.filter.channels.contains(&c);
                        html! { <button class={classes!("chip", on.then_some("on"))} aria-pressed={on.to_string()}
                            onclick={Callback::from(move |_| d.dispatch(Action::ToggleChannel(c)))}>{ channel_icon(c) }{ " " }{ c.label() }</button> }
                    }) }
                </div>
            </header>
            <ul id="conversation-list" class="rows" tabindex="0" onkeydown={on_key} onscroll={on_scroll} ref={list_ref}
                aria-rowcount={total.to_string()}>
                if rows.is_empty() { <li class="empty muted">{ "No conversations here." }</li> }
                if offset > 0 { <li class="spacer" aria-hidden="true" style={format!("height: {}px", offset * ROW_HEIGHT)}></li> }
                { for rows.iter().enumerate().map(|(i, r)| {
                    let selected = desk.selected.as_deref() == Some(r.summary.id.0.as_str());
                    html! { <Row dispatch={desk.dispatcher()} row={r.clone()} cursor={offset + i == desk.cursor} {selected} index={offset + i} /> }
                }) }
                if total > offset + rows.len() {
                    <li class="spacer" aria-hidden="true" style={format!("height: {}px", (total - offset - rows.len()) * ROW_HEIGHT)}></li>
                }
            </ul>
        </section>
    }
}

/// Every row of the list is this tall (`.row` in style.css), so the window knows where each row is.
const ROW_HEIGHT: usize = 78;

pub fn focus(id: &str) {
    let element = web_sys::window().and_then(|w| w.document()).and_then(|d| d.get_element_by_id(id));
    if let Some(el) = element.and_then(|el| el.dyn_into::<web_sys::HtmlElement>().ok()) {
        let _ = el.focus();
    }
}

/// A row is drawn again only when what it shows changes (not on every change of the desk).
#[derive(Properties, PartialEq)]
struct RowProps {
    dispatch: yew::UseReducerDispatcher<crate::Desk>,
    row: RowView,
    cursor: bool,
    selected: bool,
    /// Its place in the whole list (for assistive technology: "row 4,512 of 7,000").
    index: usize,
}

#[function_component(Row)]
fn row(props: &RowProps) -> Html {
    let r = &props.row;
    let s = &r.summary;
    let id = s.id.0.clone();
    let open = {
        let (d, id) = (props.dispatch.clone(), id.clone());
        Callback::from(move |_| d.dispatch(Action::Open(id.clone())))
    };
    let join = r.join.map(|kind| {
        let (d, id) = (props.dispatch.clone(), id.clone());
        let label = if kind == JoinKind::Grab { "GRAB" } else { "JOIN" };
        html! { <button class="join" onclick={Callback::from(move |e: MouseEvent| { e.stop_propagation(); crate::run_command_by(&d, "join", OwnedId { id: id.clone() }) })}>{ label }</button> }
    });
    let selected = props.selected;
    html! {
        <li class={classes!("row", props.cursor.then_some("cursor"), selected.then_some("selected"))} onclick={open} data-id={id.clone()}
            aria-rowindex={(props.index + 1).to_string()}>
            <div class="row-top">
                <span class="customer">
                    if r.unread { <span class="unread" title="Unread">{ "●" }</span> }
                    { s.customer.name.clone() }
                </span>
                <span class="muted small">{ channel_icon(s.channel) }{ " " }{ s.channel.label() }{ " · " }{ r.team_name.clone() }</span>
            </div>
            <div class="row-mid muted">{ s.last_message.as_ref().map(|m| m.text.clone()).unwrap_or_default() }</div>
            <div class="row-bottom">
                { for r.badges.iter().map(|b| html! { <span class={badge_class(*b)}>{ b.label() }</span> }) }
                if let Some(w) = r.waiting_ms { <span class="waiting">{ format!("⏱ {}", format_waiting(w)) }</span> }
                if r.unsynced { <span class="unsynced" title="Not yet synced">{ "↻" }</span> }
                <span class="spacer"></span>
                { for join }
            </div>
        </li>
    }
}

// ---- green block ------------------------------------------------------------------------------

/// Leaves the open conversation (‹ on narrow windows, "Back to the list").
fn close(desk: &DeskHandle) -> Callback<MouseEvent> {
    let d = desk.clone();
    Callback::from(move |_| d.dispatch(Action::Close))
}

/// The green block when no conversation is on screen: nothing picked, still opening, or the read
/// failed (with the reason and a way to try again; it is also tried again by itself a few times).
fn empty_pane(desk: &DeskHandle) -> Html {
    if desk.selected.is_none() {
        return html! { <section class="conversation empty-state"><p class="muted">{ "Pick a conversation. ↑ ↓ to move, Enter to open, R to reply." }</p></section> };
    }
    let back = close(desk);
    match desk.detail_error.clone() {
        Some(e) => {
            let retry = {
                let d = desk.clone();
                Callback::from(move |_| d.dispatch(Action::RetryDetail))
            };
            html! {
                <section class="conversation empty-state" role="alert">
                    <p>{ "This conversation could not be opened: " }{ e }</p>
                    <p>
                        <button class="link" onclick={retry}>{ "Try again" }</button>
                        <button class="link back-list" onclick={back}>{ "Back to the list" }</button>
                    </p>
                </section>
            }
        }
        None => {
            html! { <section class="conversation empty-state"><p class="muted">{ "Opening the conversation…" }</p></section> }
        }
    }
}

#[function_component(ConversationPane)]
pub fn conversation_pane(props: &DeskProps) -> Html {
    let desk = &props.desk;
    let editing = use_state(|| false);
    let transferring = use_state(|| false);
    let Some(v) = desk.detail.clone().filter(|v| desk.selected.as_deref() == Some(v.row.summary.id.0.as_str())) else {
        return empty_pane(desk);
    };
    let s = &v.row.summary;
    let id = s.id.0.clone();
    let command = |cmd: &'static str| {
        let (d, id) = (desk.clone(), id.clone());
        Callback::from(move |_| run_command(&d, cmd, OwnedId { id: id.clone() }))
    };
    let back = close(desk);
    let crew_names: Vec<String> = v.crew.iter().map(|c| c.name.clone()).collect();
    let web = s.channel == Channel::WebWidget;
    let last_active = s.presence.last_active.map(|t| format_age(t.0)).unwrap_or_else(|| "—".into());
    html! {
        <section class="conversation" aria-label="Conversation">
            <header class="conv-head">
                <button class="link back" onclick={back}>{ "‹" }</button>
                <div class="who">
                    <div class="name">
                        { s.customer.name.clone() }
                        if v.may_edit_customer {
                            <button class="icon" title="Edit customer details" id="edit-customer"
                                onclick={{ let e = editing.clone(); Callback::from(move |_| e.set(!*e)) }}>{ "📄" }</button>
                        }
                    </div>
                    <div class="muted small">
                        { channel_icon(s.channel) }{ " " }{ s.channel.label() }{ " · " }{ v.row.team_name.clone() }
                        { s.customer.email.as_ref().map(|e| format!(" · {e}")).unwrap_or_default() }
                        { s.customer.phone.as_ref().map(|p| format!(" · {p}")).unwrap_or_default() }
                    </div>
                    if web {
                        <div class="muted small presence">
                            <span class={if s.presence.online { "dot on" } else { "dot" }}></span>
                            { if s.presence.online { "Online".to_owned() } else { format!("Last active {last_active}") } }
                            { " · Location: " }{ s.presence.location.clone().unwrap_or_else(|| "unknown".into()) }
                        </div>
                    }
                </div>
                <div class="head-actions">
                    <span class="crew" title={ if crew_names.is_empty() { "Nobody is in this conversation".to_owned() } else { format!("In this conversation: {}", crew_names.join(", ")) } }>
                        { format!("👥 {}", v.crew.len()) }
                    </span>
                    { for v.row.badges.iter().map(|b| html! { <span class={badge_class(*b)}>{ b.label() }</span> }) }
                    if let Some(kind) = v.row.join {
                        <button class="join" id="conv-join" onclick={command("join")}>{ if kind == JoinKind::Grab { "GRAB" } else { "JOIN" } }</button>
                    }
                    if !v.transfer_to.is_empty() {
                        <button class="secondary" id="transfer" title="Hand this conversation to a colleague"
                            onclick={{ let t = transferring.clone(); Callback::from(move |_| t.set(!*t)) }}>{ "↪ TRANSFER" }</button>
                    }
                    if v.may_leave { <button class="secondary" id="leave" onclick={command("leave")}>{ "LEAVE" }</button> }
                    if v.may_close { <button class="secondary" id="close" onclick={command("close")}>{ "CLOSE" }</button> }
                </div>
            </header>
            if *transferring && !v.transfer_to.is_empty() {
                <div class="transfer-panel" role="group" aria-label="Transfer">
                    <span class="small muted">{ "Hand this conversation to:" }</span>
                    { for v.transfer_to.iter().map(|c| {
                        let (d, id, to, t) = (desk.clone(), id.clone(), c.id.0.clone(), transferring.clone());
                        // In a grab-mode team the conversation is the colleague's now and hidden from
                        // this agent: the pane closes instead of saying so.
                        let leaves_view = v.team_mode == TeamMode::Grab;
                        let onclick = Callback::from(move |_| {
                            t.set(false);
                            let (d, args) = (d.clone(), TransferArgs { id: id.clone(), to: to.clone() });
                            wasm_bindgen_futures::spawn_local(async move {
                                match call::<_, serde::de::IgnoredAny>("transfer", &args).await {
                                    Ok(_) => {
                                        d.dispatch(Action::Error(None));
                                        if leaves_view {
                                            d.dispatch(Action::Close);
                                        }
                                    }
                                    Err(e) => d.dispatch(Action::Error(Some(e))),
                                }
                                d.dispatch(Action::Changed(Vec::new()));
                            });
                        });
                        html! { <button class="secondary" id={format!("transfer-{}", c.id.0)} {onclick}>{ c.name.clone() }</button> }
                    }) }
                    <button class="link" onclick={{ let t = transferring.clone(); Callback::from(move |_| t.set(false)) }}>{ "Cancel" }</button>
                </div>
            }
            if *editing { <CustomerForm desk={desk.clone()} view={v.clone()} done={{ let e = editing.clone(); Callback::from(move |_| e.set(false)) }} /> }
            <Messages view={v.clone()} dispatch={desk.dispatcher()} />
            <UndeliveredList desk={desk.clone()} view={v.clone()} />
            if let Some((_, text, _)) = desk.typing.as_ref().filter(|t| t.0 == v.row.summary.id.0) {
                <p id="typing" class="typing small muted" aria-live="polite">{ text.clone() }</p>
            }
            <Composer desk={desk.clone()} view={v.clone()} />
        </section>
    }
}

fn format_age(ms: i64) -> String {
    let now = js_sys::Date::now() as i64;
    let mins = (now - ms).max(0) / 60_000;
    match mins {
        0 => "just now".into(),
        m if m < 60 => format!("{m} min ago"),
        m if m < 48 * 60 => format!("{} h ago", m / 60),
        m => format!("{} days ago", m / (24 * 60)),
    }
}

fn format_time(ms: i64) -> String {
    let d = js_sys::Date::new(&wasm_bindgen::JsValue::from_f64(ms as f64));
    format!("{:02}:{:02}", d.get_hours(), d.get_minutes())
}

#[derive(Properties, PartialEq)]
struct ViewProps {
    view: DetailView,
    dispatch: yew::UseReducerDispatcher<crate::Desk>,
}

#[function_component(Messages)]
fn messages(props: &ViewProps) -> Html {
    let v = &props.view;
    let name_of = |id: &crewdesk::domain::AgentId| {
        v.names.iter().find(|n| &n.id == id).map_or_else(|| id.to_string(), |n| n.name.clone())
    };
    let list_ref = use_node_ref();
    {
        // To the newest message when the conversation opens and when a new one arrives (not when
        // earlier messages are added above).
        let list_ref = list_ref.clone();
        let newest = (v.row.summary.id.0.clone(), v.messages.last().map(|m| m.id.clone()));
        use_effect_with(newest, move |_| {
            if let Some(el) = list_ref.cast::<web_sys::Element>() {
                el.set_scroll_top(el.scroll_height());
            }
            || ()
        });
    }
    // The newest messages are asked for and drawn; older ones a batch at a time on request (a
    // conversation of thousands opens as fast as a short one).
    let earlier = (v.earlier > 0).then(|| {
        let d = props.dispatch.clone();
        let more = Callback::from(move |_: MouseEvent| d.dispatch(Action::ShowEarlier));
        html! {
            <li class="earlier">
                <button id="show-earlier" class="link" onclick={more}>
                    { format!("Show {} earlier messages ({} in all)", v.earlier.min(crate::EARLIER_STEP), v.earlier) }
                </button>
            </li>
        }
    });
    html! {
        <ol class="messages" ref={list_ref}>
            { for earlier }
            { for v.messages.iter().map(|m| {
                let (class, who) = match &m.author {
                    Author::Customer => ("msg customer", v.row.summary.customer.name.clone()),
                    Author::Crew { .. } if m.body.handed_to().is_some() => ("msg handover", "↪ Hand-over".to_owned()),
                    Author::Crew { agent } if m.body.is_internal() => ("msg note", format!("📝 Internal note by {}", name_of(agent))),
                    Author::Crew { agent } => ("msg crew", name_of(agent)),
                    Author::System => ("msg system", "Crewdesk".to_owned()),
                };
                let body = match &m.body {
                    MessageBody::Text { text } => html! { <p>{ text.clone() }</p> },
                    MessageBody::Template { template, text } => html! { <p>{ text.clone() }<small class="muted">{ format!(" 📃 {template}") }</small></p> },
                    MessageBody::WhatsAppTemplate { template, text, .. } => html! { <p>{ text.clone() }<small class="muted">{ format!(" 💬 {template}") }</small></p> },
                    MessageBody::Attachment { blob, file_name, mime, size } => html! {
                        <Attachment id={v.row.summary.id.0.clone()} blob={blob.clone()} file_name={file_name.clone()} mime={mime.clone()} size={*size} />
                    },
                    MessageBody::ConferenceInvitation { url } => html! { <p>{ "📹 Conference invitation: " }<span class="url">{ url.clone() }</span></p> },
                    MessageBody::Note { text } => html! { <p>{ text.clone() }</p> },
                    MessageBody::Transfer { to } => {
                        let from = match &m.author { Author::Crew { agent } => name_of(agent), _ => String::new() };
                        html! { <p>{ format!("{from} handed this conversation to {}", name_of(to)) }</p> }
                    }
                };
                html! {
                    <li class={class}>
                        <div class="meta small muted">{ who }{ " · " }{ format_time(m.at.0) }</div>
                        { body }
                    </li>
                }
            }) }
        </ol>
    }
}

#[derive(Properties, PartialEq)]
struct AttachmentProps {
    id: String,
    blob: String,
    file_name: String,
    mime: String,
    size: u64,
}

#[derive(Serialize)]
struct BlobArgs {
    id: String,
    blob: String,
}

/// 📎 in a conversation: images show a preview (the relay's thumbnail, or the local file); every
/// file can be saved to Downloads.
#[function_component(Attachment)]
fn attachment(props: &AttachmentProps) -> Html {
    let preview = use_state(|| None::<String>);
    let note = use_state(|| None::<String>);
    {
        let (preview, id, blob, image) =
            (preview.clone(), props.id.clone(), props.blob.clone(), props.mime.starts_with("image/"));
        use_effect_with(props.blob.clone(), move |_| {
            if image {
                wasm_bindgen_futures::spawn_local(async move {
                    // The sender's upload may still be on its way (or the sender offline): ask again.
                    for _ in 0..40 {
                        let args = BlobArgs { id: id.clone(), blob: blob.clone() };
                        if let Ok(url) = call::<_, String>("attachment_preview", &args).await {
                            preview.set(Some(url));
                            return;
                        }
                        gloo_timers::future::TimeoutFuture::new(3_000).await;
                    }
                });
            }
            || ()
        });
    }
    let save = {
        let (note, id, blob) = (note.clone(), props.id.clone(), props.blob.clone());
        Callback::from(move |_: MouseEvent| {
            let (note, id, blob) = (note.clone(), id.clone(), blob.clone());
            note.set(Some("Saving…".into()));
            wasm_bindgen_futures::spawn_local(async move {
                match call::<_, String>("save_attachment", &BlobArgs { id, blob }).await {
                    Ok(path) => note.set(Some(format!("Saved to {path}"))),
                    Err(e) => note.set(Some(e)),
                }
            });
        })
    };
    // A preview that loads while the newest messages are in view keeps them in view.
    let keep_bottom = Callback::from(|e: Event| {
        let Some(img) = e.target_dyn_into::<web_sys::Element>() else { return };
        if let Ok(Some(list)) = img.closest(".messages") {
            let below = list.scroll_height() - list.scroll_top() - list.client_height();
            if below <= img.client_height() + 80 {
                list.set_scroll_top(list.scroll_height());
            }
        }
    });
    let kb = props.size.div_ceil(1024).max(1);
    html! {
        <div class="attachment">
            if let Some(src) = (*preview).clone() { <img class="thumb" src={src} alt={props.file_name.clone()} onload={keep_bottom} /> }
            <p>{ format!("📎 {} ({kb} KB)", props.file_name) }
                <button class="link save-attachment" onclick={save}>{ "Save" }</button>
            </p>
            if let Some(n) = (*note).clone() { <p class="small muted attachment-note">{ n }</p> }
        </div>
    }
}

#[derive(Properties, PartialEq)]
struct ComposerProps {
    desk: DeskHandle,
    view: DetailView,
}

#[derive(Serialize)]
struct SendArgs {
    id: String,
    text: String,
    /// The 📃 template the text was filled from (and maybe edited), if any.
    template: Option<String>,
    /// 📝 an internal note: for the crew only, never sent to the customer.
    note: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AttachArgs {
    id: String,
    file_name: String,
    mime: String,
    bytes: Vec<u8>,
}

const MAX_ATTACHMENT_BYTES: f64 = 10.0 * 1024.0 * 1024.0;

fn click(id: &str) {
    let element = web_sys::window().and_then(|w| w.document()).and_then(|d| d.get_element_by_id(id));
    if let Some(el) = element.and_then(|el| el.dyn_into::<web_sys::HtmlElement>().ok()) {
        el.click();
    }
}

#[derive(Serialize)]
struct WhatsAppArgs {
    id: String,
    template: String,
    params: Vec<String>,
}

#[derive(Serialize)]
struct DismissArgs {
    id: String,
    message: String,
}

/// Copies text to the clipboard (the webview's `navigator.clipboard.writeText`).
fn copy_to_clipboard(text: &str) {
    use wasm_bindgen::JsCast;
    let Some(window) = web_sys::window() else { return };
    let get = |o: &wasm_bindgen::JsValue, k: &str| js_sys::Reflect::get(o, &k.into()).ok();
    let clipboard = get(&window.into(), "navigator").and_then(|n| get(&n, "clipboard"));
    if let Some(clipboard) = clipboard
        && let Some(write) = get(&clipboard, "writeText").and_then(|f| f.dyn_into::<js_sys::Function>().ok())
    {
        let _ = write.call1(&clipboard, &text.into());
    }
}

/// Messages the relay refused: each with why, its text to copy, and a way to dismiss it.
#[function_component(UndeliveredList)]
fn undelivered_list(props: &ComposerProps) -> Html {
    let v = &props.view;
    if v.undelivered.is_empty() {
        return html! {};
    }
    let id = v.row.summary.id.0.clone();
    html! {
        <section class="undelivered" id="undelivered">
            { for v.undelivered.iter().map(|u| {
                let text = u.message.body.text_content();
                let copy = { let t = text.clone(); Callback::from(move |_| copy_to_clipboard(&t)) };
                let dismiss = {
                    let (d, id, message) = (props.desk.clone(), id.clone(), u.message.id.0.clone());
                    Callback::from(move |_| run_command(&d, "dismiss_undelivered", DismissArgs { id: id.clone(), message: message.clone() }))
                };
                html! {
                    <div class="undelivered-message">
                        <div class="small notice">{
                            if u.retrying { format!("Not delivered yet, sent again once in sync: {}", u.reason) }
                            else { format!("Not delivered: {}", u.reason) }
                        }</div>
                        <p class="selectable">{ text }</p>
                        <div class="tools">
                            <button class="copy-undelivered" onclick={copy}>{ "Copy text" }</button>
                            if !u.retrying { <button class="dismiss-undelivered" onclick={dismiss}>{ "Dismiss" }</button> }
                        </div>
                    </div>
                }
            }) }
        </section>
    }
}

#[function_component(Composer)]
fn composer(props: &ComposerProps) -> Html {
    let v = &props.view;
    let id = v.row.summary.id.0.clone();
    let text = use_state(String::new);
    // The 📃 template the composer was filled from, until it is sent or emptied.
    let template = use_state(|| None::<String>);
    // 📝 the composer writes an internal note (crew only) while this is on.
    let note = use_state(|| false);
    let menu = use_state(|| None::<&'static str>);
    let wa_params = use_state(String::new);
    // The customer (and teammates) see this agent typing; said at most every 2 s, never for notes.
    // (A hook: before any early return, so hooks run in the same order on every render.)
    let last_typing = use_mut_ref(|| 0.0_f64);
    if let Some(reason) = &v.composer_blocked {
        return html! { <footer class="composer blocked"><span class="muted">{ reason.clone() }</span></footer> };
    }
    let window_closed = v.whatsapp_window_open == Some(false);
    let send = {
        let (d, id, text, template, note) =
            (props.desk.clone(), id.clone(), text.clone(), template.clone(), note.clone());
        Callback::from(move |_: ()| {
            let t = (*text).clone();
            if t.trim().is_empty() {
                return;
            }
            text.set(String::new());
            let from = if *note { None } else { (*template).clone() };
            template.set(None);
            run_command(&d, "send", SendArgs { id: id.clone(), text: t, template: from, note: *note });
        })
    };
    let on_key = {
        let send = send.clone();
        Callback::from(move |e: KeyboardEvent| {
            // Enter sends, Shift+Enter is a new line.
            if e.key() == "Enter" && !e.shift_key() {
                e.prevent_default();
                send.emit(());
            }
        })
    };
    let on_input = {
        let (text, template, note, id) = (text.clone(), template.clone(), note.clone(), id.clone());
        Callback::from(move |e: InputEvent| {
            let value = input_value(&e);
            if value.trim().is_empty() {
                template.set(None);
            }
            let now = js_sys::Date::now();
            if !*note && !value.trim().is_empty() && now - *last_typing.borrow() > 2_000.0 {
                *last_typing.borrow_mut() = now;
                let id = id.clone();
                wasm_bindgen_futures::spawn_local(async move {
                    // Typing is not worth an error on screen: a failure is only a missed hint.
                    let _ = call::<_, serde::de::IgnoredAny>("typing", &OwnedId { id }).await;
                });
            }
            text.set(value)
        })
    };
    let toggle = |name: &'static str| {
        let menu = menu.clone();
        Callback::from(move |_| menu.set(if *menu == Some(name) { None } else { Some(name) }))
    };
    let menu_html = match *menu {
        Some("templates") => html! {
            <div class="menu" role="menu">
                { for v.templates.iter().map(|t| {
                    // Picking a template fills the composer (placeholders filled) for editing.
                    let me = props.desk.session.agent.as_ref().map_or(String::new(), |a| a.name.clone());
                    let filled = crewdesk::domain::fill_template(&t.text, &v.row.summary.customer, &me);
                    let (text, template, name, menu) = (text.clone(), template.clone(), t.name.clone(), menu.clone());
                    html! { <button role="menuitem" class="template" onclick={Callback::from(move |_| {
                            menu.set(None);
                            text.set(filled.clone());
                            template.set(Some(name.clone()));
                            focus("composer");
                        })}>
                        <strong>{ t.name.clone() }</strong><small class="muted">{ t.text.clone() }</small></button> }
                }) }
            </div>
        },
        Some("whatsapp") => html! {
            <div class="menu" role="menu">
                <p class="small muted">{ if window_closed { "Outside the 24 h window: only approved templates can be sent." } else { "Approved templates. Parameters, comma separated:" } }</p>
                <input class="params" placeholder="e.g. Maya, #4471" value={(*wa_params).clone()}
                    oninput={{ let p = wa_params.clone(); Callback::from(move |e: InputEvent| p.set(input_value(&e))) }} />
                { for v.whatsapp_templates.iter().map(|t| {
                    let (d, id, name, menu, params) = (props.desk.clone(), id.clone(), t.name.clone(), menu.clone(), wa_params.clone());
                    html! { <button role="menuitem" onclick={Callback::from(move |_| {
                        let list: Vec<String> = params.split(',').map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()).collect();
                        menu.set(None);
                        run_command(&d, "send_whatsapp_template", WhatsAppArgs { id: id.clone(), template: name.clone(), params: list });
                    })}><strong>{ t.name.clone() }</strong><small class="muted">{ t.body.clone() }</small></button> }
                }) }
            </div>
        },
        _ => html! {},
    };
    let is_whatsapp = v.whatsapp_window_open.is_some();
    let attach = {
        let (d, id) = (props.desk.clone(), id.clone());
        Callback::from(move |e: Event| {
            let Some(input) = e.target().and_then(|t| t.dyn_into::<web_sys::HtmlInputElement>().ok()) else { return };
            let Some(file) = input.files().and_then(|f| f.get(0)) else { return };
            input.set_value("");
            let (d, id) = (d.clone(), id.clone());
            wasm_bindgen_futures::spawn_local(async move {
                if file.size() > MAX_ATTACHMENT_BYTES {
                    d.dispatch(Action::Error(Some(format!("{} is larger than 10 MB", file.name()))));
                    return;
                }
                let Ok(buffer) = wasm_bindgen_futures::JsFuture::from(file.array_buffer()).await else {
                    d.dispatch(Action::Error(Some(format!("could not read {}", file.name()))));
                    return;
                };
                let bytes = js_sys::Uint8Array::new(&buffer).to_vec();
                run_command(&d, "attach", AttachArgs { id, file_name: file.name(), mime: file.type_(), bytes });
            });
        })
    };
    html! {
        <footer class="composer">
            { menu_html }
            if window_closed {
                <p class="notice small">{ "The customer's last WhatsApp message is more than 24 hours old: free text is blocked, send an approved template (💬)." }</p>
            }
            if let Some(reason) = &v.refused {
                <p class="notice refused small" id="refused">{ format!("The relay refused a change you made here: {reason}") }</p>
            }
            if let Some(name) = &*template { <p class="small muted" id="from-template">{ format!("📃 {name}: edit, then send") }</p> }
            <textarea id="composer" rows="3" class={classes!((*note).then_some("note"))}
                placeholder={ if *note { "Internal note: only the crew sees it (Enter saves, Shift+Enter new line)" } else if window_closed { "Only WhatsApp templates can be sent now" } else { "Write a reply… (Enter sends, Shift+Enter new line)" } }
                value={(*text).clone()} oninput={on_input} onkeydown={on_key} disabled={window_closed && !*note} />
            <div class="tools">
                <input type="file" id="file-picker" class="hidden" onchange={attach} />
                <button class="icon" title="Attach a file or image" id="attach" disabled={window_closed}
                    onclick={Callback::from(|_| click("file-picker"))}>{ "📎" }</button>
                <button class="icon" title="Message templates" id="templates" onclick={toggle("templates")} disabled={window_closed}>{ "📃" }</button>
                <button class={classes!("icon", (*note).then_some("on"))} id="note-toggle" aria-pressed={note.to_string()}
                    title="Internal note: only the crew sees it, no channel ever sends it to the customer"
                    onclick={{ let note = note.clone(); Callback::from(move |_| note.set(!*note)) }}>{ "📝" }</button>
                <button class="icon" title={ if is_whatsapp { "WhatsApp templates" } else { "WhatsApp templates (WhatsApp conversations only)" } } id="wa-templates" onclick={toggle("whatsapp")} disabled={!is_whatsapp}>{ "💬" }</button>
                <button class="icon" title="Send a conference link" id="conference" disabled={window_closed}
                    onclick={{ let (d, id) = (props.desk.clone(), id.clone()); Callback::from(move |_| run_command(&d, "send_conference", OwnedId { id: id.clone() })) }}>{ "📹" }</button>
                <span class="spacer"></span>
                if v.email_fallback { <span class="fallback small">{ "Customer is offline. Email fallback activated" }</span> }
                <button class="primary" id="send" title={ if *note { "Save the note (Enter)" } else { "Send (Enter)" } } disabled={window_closed && !*note} onclick={{ let s = send.clone(); Callback::from(move |_| s.emit(())) }}>{ "▶" }</button>
            </div>
        </footer>
    }
}

#[derive(Properties, PartialEq)]
struct FormProps {
    desk: DeskHandle,
    view: DetailView,
    done: Callback<()>,
}

#[derive(Serialize)]
struct EditArgs {
    id: String,
    edit: CustomerEdit,
}

#[function_component(CustomerForm)]
fn customer_form(props: &FormProps) -> Html {
    let c = props.view.row.summary.customer.clone();
    let name = use_state(|| c.name.clone());
    let email = use_state(|| c.email.clone().unwrap_or_default());
    let phone = use_state(|| c.phone.clone().unwrap_or_default());
    let notes = use_state(|| c.notes.clone().unwrap_or_default());
    let field = |label: &str, state: &UseStateHandle<String>, id: &str| {
        let s = state.clone();
        html! { <label>{ label.to_owned() }<input id={id.to_owned()} value={(**state).clone()} oninput={Callback::from(move |e: InputEvent| s.set(input_value(&e)))} /></label> }
    };
    let save = {
        let (d, id, done) = (props.desk.clone(), props.view.row.summary.id.0.clone(), props.done.clone());
        let (name, email, phone, notes) = (name.clone(), email.clone(), phone.clone(), notes.clone());
        Callback::from(move |e: SubmitEvent| {
            e.prevent_default();
            let edit = CustomerEdit {
                name: Some((*name).clone()),
                email: Some((*email).clone()),
                phone: Some((*phone).clone()),
                notes: Some((*notes).clone()),
            };
            run_command(&d, "edit_customer", EditArgs { id: id.clone(), edit });
            done.emit(());
        })
    };
    html! {
        <form class="customer-form" onsubmit={save}>
            { field("Name", &name, "customer-name") }
            { field("Email", &email, "customer-email") }
            { field("Phone", &phone, "customer-phone") }
            { field("Notes", &notes, "customer-notes") }
            <div class="form-actions">
                <button type="button" class="secondary" onclick={{ let d = props.done.clone(); Callback::from(move |_| d.emit(())) }}>{ "Cancel" }</button>
                <button type="submit" class="primary">{ "Save" }</button>
            </div>
        </form>
    }
}
