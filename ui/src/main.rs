//! Crewdesk's desk: the red block (views, teams, statuses with live counts), the yellow block (the
//! list), the green block (the conversation), Notifications at the bottom left and the sync state.

mod api;
mod templates;
mod views;

use api::{NoArgs, call};
use crewdesk::desk::{DetailView, ListView, NotificationView, SessionView};
use crewdesk::domain::Channel;
use crewdesk::domain::filter::{Filter, Selection, Sort};
use serde::{Deserialize, Serialize};
use std::rc::Rc;
use yew::prelude::*;

/// The shell's sync status (online, unsynced changes).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct SyncStatus {
    pub connected: bool,
    pub unsynced_changes: usize,
    #[serde(default)]
    pub pending_uploads: usize,
    pub last_error: Option<String>,
    /// The relay signed this desk out (its token was revoked): sync has stopped.
    #[serde(default)]
    pub signed_out: bool,
    /// Conversations still to compare with the relay after connecting.
    #[serde(default)]
    pub checking: usize,
}

#[derive(Clone, PartialEq)]
pub struct Desk {
    pub session: SessionView,
    pub filter: Filter,
    pub search: String,
    pub list: Option<ListView>,
    pub selected: Option<String>,
    pub cursor: usize,
    pub detail: Option<DetailView>,
    /// Why the open conversation could not be read, shown in its pane with a way to try again.
    pub detail_error: Option<String>,
    /// The request number of the detail shown: answers to older requests are dropped, so a slow
    /// answer for a conversation left behind never replaces the one on screen.
    pub detail_seq: u64,
    /// Failed reads of the open conversation in a row; each one asks again a little later.
    pub detail_failures: u32,
    /// Bumped to read the open conversation again without reloading everything else.
    pub detail_retry: u32,
    /// How many of the open conversation's newest messages are asked for ("Show earlier" adds more).
    pub detail_newest: usize,
    pub notifications: Vec<NotificationView>,
    pub sync: SyncStatus,
    pub error: Option<String>,
    /// Bumped by every change event (and by the clock for the list): reloads the list.
    pub revision: u64,
    /// Bumped by change events that concern the open conversation: reads it again (never on a
    /// timer).
    pub detail_revision: u64,
    /// The request number of the shown list and notifications (every list request has a new one,
    /// for a new revision, filter, search or window): answers to older requests that arrive late
    /// are dropped, so two quick filter changes never leave the first one's list on screen.
    pub shown: u64,
    /// Someone typing: the conversation, what to show ("Maya Rossi is typing…") and its number
    /// (shown for a few seconds after the last word of it).
    pub typing: Option<(String, String, u64)>,
    /// The team whose 📃 templates an admin is editing (the editor is open).
    pub editing_templates: Option<crewdesk::domain::TeamId>,
    /// Lists shown so far: each new one leaves a performance mark once it is in the page.
    pub lists_shown: u64,
}

pub enum Action {
    Session(Box<SessionView>),
    Select(Selection),
    Team(Option<crewdesk::domain::TeamId>),
    ToggleChannel(Channel),
    Sort(Sort),
    Search(String),
    /// The answer to the list request with this number.
    Loaded(u64, Box<ListView>),
    Open(String),
    Move(i64),
    /// An answer to the detail request with this number, for this conversation: the conversation
    /// or why it could not be read.
    Detail(u64, String, Result<Box<DetailView>, String>),
    /// Reads the open conversation again (after a failure).
    RetryDetail,
    /// Draws older messages of the open conversation too.
    ShowEarlier,
    /// Leaves the open conversation (the back button on narrow screens).
    Close,
    Notifications(u64, Vec<NotificationView>),
    Sync(SyncStatus),
    Error(Option<String>),
    /// Conversations changed (none listed: anything may have).
    Changed(Vec<String>),
    /// Statuses move with the clock: the list and counts are read again, the open conversation not.
    Clock,
    /// The list window starts at this row (the agent scrolled).
    Window(usize),
    /// Someone is typing in a conversation (number, conversation, text).
    Typing(u64, String, String),
    /// The typing with this number is over (nothing newer came).
    TypingOver(u64),
    /// Opens the 📃 template editor of a team (admins), or closes it.
    EditTemplates(Option<crewdesk::domain::TeamId>),
}

/// How long "… is typing" stays after the last word of it.
const TYPING_SHOWN_MS: u32 = 5_000;

#[derive(serde::Deserialize)]
struct TypingEvent {
    id: String,
    text: String,
}

#[derive(serde::Deserialize)]
struct ChangedIds {
    #[serde(default)]
    ids: Vec<String>,
}

/// Rows asked for at once: the list shows a window of the whole result around what is on screen.
pub const PAGE: usize = 64;

impl Desk {
    /// Moves the window so that row `index` is inside it (with rows before and after).
    fn window_around(&mut self, index: usize) {
        let (offset, len) = self.list.as_ref().map_or((0, 0), |l| (l.offset, l.rows.len()));
        if index < offset || index >= offset + len {
            self.filter.offset = index.saturating_sub(PAGE / 2);
        }
    }

    /// A new list (another selection, team, channel, sort or search): from the top.
    fn back_to_top(&mut self) {
        self.filter.offset = 0;
        self.cursor = 0;
    }

    /// The desk before the shell answers.
    fn opening() -> Desk {
        Desk {
            // Until the shell answers: "Opening your desk…", not a sign-in form that flashes by.
            session: SessionView { opening: true, ..SessionView::default() },
            filter: Filter { limit: PAGE, ..Filter::default() },
            search: String::new(),
            list: None,
            selected: None,
            cursor: 0,
            detail: None,
            detail_error: None,
            detail_seq: 0,
            detail_failures: 0,
            detail_retry: 0,
            detail_newest: MESSAGES_SHOWN,
            notifications: Vec::new(),
            sync: SyncStatus::default(),
            error: None,
            revision: 0,
            detail_revision: 0,
            shown: 0,
            typing: None,
            editing_templates: None,
            lists_shown: 0,
        }
    }
}

impl Reducible for Desk {
    type Action = Action;
    fn reduce(self: Rc<Self>, action: Action) -> Rc<Self> {
        let mut d = (*self).clone();
        match action {
            Action::Session(s) => d.session = *s,
            Action::Select(sel) => {
                d.filter.selection = sel;
                d.back_to_top();
            }
            Action::Team(t) => {
                d.filter.team = t;
                d.back_to_top();
            }
            Action::ToggleChannel(c) => {
                if let Some(i) = d.filter.channels.iter().position(|x| *x == c) {
                    d.filter.channels.remove(i);
                } else {
                    d.filter.channels.push(c);
                }
                d.back_to_top();
            }
            Action::Sort(s) => {
                d.filter.sort = s;
                d.back_to_top();
            }
            Action::Search(q) => {
                d.search = q;
                d.back_to_top();
            }
            Action::Loaded(rev, _) if rev < d.shown => {}
            Action::Loaded(rev, l) => {
                let l = *l;
                d.shown = rev;
                d.cursor = d.cursor.min(l.total.saturating_sub(1));
                d.list = Some(l);
                d.lists_shown += 1;
            }
            Action::Open(id) => {
                if let Some(l) = d.list.as_ref()
                    && let Some(i) = l.rows.iter().position(|r| r.summary.id.0 == id)
                {
                    d.cursor = l.offset + i;
                }
                if d.selected.as_deref() != Some(id.as_str()) {
                    d.detail_error = None;
                    d.detail_failures = 0;
                    d.detail_newest = MESSAGES_SHOWN;
                }
                d.selected = Some(id);
            }
            Action::Move(delta) => {
                let n = d.list.as_ref().map_or(0, |l| l.total);
                if n > 0 {
                    d.cursor = (d.cursor as i64 + delta).clamp(0, n as i64 - 1) as usize;
                    let cursor = d.cursor;
                    d.window_around(cursor);
                }
            }
            Action::Window(offset) => {
                if d.filter.offset != offset {
                    d.filter.offset = offset;
                }
            }
            // Late answers, and answers for a conversation the agent has left, change nothing.
            Action::Detail(seq, id, _) if seq < d.detail_seq || d.selected.as_deref() != Some(id.as_str()) => {}
            Action::Detail(seq, _, answer) => {
                d.detail_seq = seq;
                match answer {
                    Ok(v) => {
                        d.detail = Some(*v);
                        d.detail_error = None;
                        d.detail_failures = 0;
                    }
                    Err(e) => {
                        d.detail_error = Some(e);
                        d.detail_failures += 1;
                    }
                }
            }
            Action::RetryDetail => d.detail_retry += 1,
            Action::ShowEarlier => d.detail_newest += EARLIER_STEP,
            Action::Close => {
                d.selected = None;
                d.detail = None;
                d.detail_error = None;
                d.detail_failures = 0;
            }
            Action::Notifications(rev, _) if rev < d.shown => {}
            Action::Notifications(_, n) => d.notifications = n,
            Action::Sync(s) => d.sync = s,
            Action::Error(e) => d.error = e,
            Action::Typing(n, id, text) => d.typing = Some((id, text, n)),
            Action::TypingOver(n) => {
                if d.typing.as_ref().is_some_and(|t| t.2 == n) {
                    d.typing = None;
                }
            }
            Action::Changed(ids) => {
                d.revision += 1;
                if ids.is_empty() || d.selected.as_ref().is_some_and(|s| ids.contains(s)) {
                    d.detail_revision += 1;
                }
            }
            Action::Clock => d.revision += 1,
            Action::EditTemplates(team) => d.editing_templates = team,
        }
        Rc::new(d)
    }
}

/// Automatic new reads of the open conversation after a failure, before it waits for "Try again".
const DETAIL_RETRIES: u32 = 5;
const DETAIL_RETRY_MS: u32 = 1_000;

pub type DeskHandle = UseReducerHandle<Desk>;

#[derive(Serialize)]
struct DetailArgs<'a> {
    id: &'a str,
    newest: usize,
}

/// Messages drawn when a conversation opens (the newest; what fills a window and more).
pub const MESSAGES_SHOWN: usize = 50;
/// Messages each "Show earlier messages" adds.
pub const EARLIER_STEP: usize = 200;

#[derive(Serialize)]
struct ListArgs<'a> {
    filter: &'a Filter,
    search: &'a str,
}

/// Runs a command and reports its error, if any, in the error bar.
pub fn run_command<A: Serialize + 'static>(desk: &DeskHandle, cmd: &'static str, args: A) {
    run_command_by(&desk.dispatcher(), cmd, args);
}

/// [`run_command`] for a component that holds only the desk's dispatcher.
pub fn run_command_by<A: Serialize + 'static>(desk: &UseReducerDispatcher<Desk>, cmd: &'static str, args: A) {
    let desk = desk.clone();
    wasm_bindgen_futures::spawn_local(async move {
        match call::<A, serde::de::IgnoredAny>(cmd, &args).await {
            Ok(_) => desk.dispatch(Action::Error(None)),
            Err(e) => desk.dispatch(Action::Error(Some(e))),
        }
        desk.dispatch(Action::Changed(Vec::new()));
    });
}

#[function_component(App)]
fn app() -> Html {
    let desk = use_reducer(Desk::opening);

    // Events from the shell: changes (reload) and sync status. No polling.
    {
        let desk = desk.clone();
        use_effect_with((), move |_| {
            let d = desk.clone();
            api::listen("desk-changed", move |payload| {
                // `{ids: [...]}`: the conversations that changed (none: anything may have).
                let ids = serde_wasm_bindgen::from_value::<ChangedIds>(payload).map(|c| c.ids).unwrap_or_default();
                d.dispatch(Action::Changed(ids))
            });
            let d = desk.clone();
            api::listen("desk-clock", move |_| d.dispatch(Action::Clock));
            let d = desk.clone();
            api::listen("sync-status", move |payload| {
                if let Ok(s) = serde_wasm_bindgen::from_value::<SyncStatus>(payload) {
                    d.dispatch(Action::Sync(s));
                }
            });
            let d = desk.clone();
            api::listen("relay-error", move |payload| d.dispatch(Action::Error(payload.as_string())));
            let d = desk.clone();
            let counter = std::rc::Rc::new(std::cell::Cell::new(0_u64));
            api::listen("typing", move |payload| {
                let Ok(t) = serde_wasm_bindgen::from_value::<TypingEvent>(payload) else { return };
                let n = counter.get() + 1;
                counter.set(n);
                d.dispatch(Action::Typing(n, t.id, t.text));
                let d = d.clone();
                wasm_bindgen_futures::spawn_local(async move {
                    gloo_timers::future::TimeoutFuture::new(TYPING_SHOWN_MS).await;
                    d.dispatch(Action::TypingOver(n));
                });
            });
            || ()
        });
    }

    // Reload session, list, notifications and sync state whenever something changed.
    {
        let desk = desk.clone();
        let requests = use_mut_ref(|| 0_u64);
        let started_listing = use_mut_ref(|| false);
        let key = (desk.revision, desk.filter.clone(), desk.search.clone());
        use_effect_with(key, move |(_, filter, search)| {
            let (filter, search) = (filter.clone(), search.clone());
            let request = {
                let mut n = requests.borrow_mut();
                *n += 1;
                *n
            };
            let started_listing = started_listing.clone();
            // Signed in already: the list is asked for at once, beside the session (which only
            // changes on sign-in, sign-out and team changes). Otherwise after the session says so.
            let signed_in = desk.session.signed_in;
            let load = {
                let desk = desk.clone();
                async move {
                    let first = !std::mem::replace(&mut *started_listing.borrow_mut(), true);
                    if first {
                        performance_mark("crewdesk:first list asked");
                    }
                    let answer = call::<_, ListView>("list", &ListArgs { filter: &filter, search: &search }).await;
                    if first {
                        performance_mark("crewdesk:first list answered");
                    }
                    match answer {
                        Ok(l) => desk.dispatch(Action::Loaded(request, Box::new(l))),
                        Err(e) => desk.dispatch(Action::Error(Some(e))),
                    }
                    if let Ok(n) = call::<_, Vec<NotificationView>>("notifications", &NoArgs {}).await {
                        desk.dispatch(Action::Notifications(request, n));
                    }
                    if let Ok(s) = call::<_, SyncStatus>("sync_status", &NoArgs {}).await {
                        desk.dispatch(Action::Sync(s));
                    }
                }
            };
            let later = if signed_in {
                wasm_bindgen_futures::spawn_local(load);
                None
            } else {
                Some(load)
            };
            wasm_bindgen_futures::spawn_local(async move {
                if let Ok(s) = call::<_, SessionView>("session", &NoArgs {}).await {
                    if request == 1 {
                        performance_mark(&format!("crewdesk:session opening={}", s.opening));
                    }
                    let now_signed_in = s.signed_in;
                    if s != desk.session {
                        desk.dispatch(Action::Session(Box::new(s)));
                    }
                    if let Some(load) = later.filter(|_| now_signed_in) {
                        load.await;
                    }
                }
            });
            || ()
        });
    }

    // The open conversation follows the selection and every change. A failed read is shown in the
    // pane and asked again after a pause (a few times, then on "Try again").
    {
        let desk = desk.clone();
        let asked = use_mut_ref(|| 0u64);
        let key = (desk.detail_revision, desk.selected.clone(), desk.detail_retry, desk.detail_newest);
        use_effect_with(key, move |(_, selected, _, newest)| {
            let newest = *newest;
            if let Some(id) = selected.clone() {
                let seq = {
                    let mut n = asked.borrow_mut();
                    *n += 1;
                    *n
                };
                wasm_bindgen_futures::spawn_local(async move {
                    let answer = call::<_, DetailView>("conversation", &DetailArgs { id: &id, newest }).await;
                    let failed = answer.is_err();
                    desk.dispatch(Action::Detail(seq, id, answer.map(Box::new)));
                    if failed && desk.detail_failures < DETAIL_RETRIES {
                        gloo_timers::future::TimeoutFuture::new(DETAIL_RETRY_MS).await;
                        desk.dispatch(Action::RetryDetail);
                    }
                });
            }
            || ()
        });
    }

    // Performance marks once a new list or conversation is in the page: the desk benchmark and the
    // E2E time interactions in the window with them ("crewdesk:list total=… offset=… search=…",
    // "crewdesk:conversation id=… messages=…").
    {
        let mark = desk
            .list
            .as_ref()
            .map(|l| format!("crewdesk:list total={} offset={} search={}", l.total, l.offset, desk.search));
        use_effect_with(desk.lists_shown, move |_| {
            if let Some(mark) = mark {
                performance_mark(&mark);
            }
            || ()
        });
        let mark = desk
            .detail
            .as_ref()
            .map(|d| format!("crewdesk:conversation id={} messages={}", d.row.summary.id.0, d.messages.len()));
        use_effect_with(desk.detail_seq, move |_| {
            if let Some(mark) = mark {
                performance_mark(&mark);
            }
            || ()
        });
    }

    if desk.session.opening {
        return html! { <div class="opening muted" role="status">{ "Opening your desk…" }</div> };
    }
    if !desk.session.signed_in {
        return html! { <views::SignIn desk={desk.clone()} /> };
    }
    let error = desk.error.clone().map(|e| {
        let d = desk.clone();
        html! {
            <div class="error-bar" role="alert">
                <span>{ e }</span>
                <button class="link" onclick={Callback::from(move |_| d.dispatch(Action::Error(None)))}>{ "Dismiss" }</button>
            </div>
        }
    });
    html! {
        <div class={classes!("desk", desk.selected.is_some().then_some("has-open"))}>
            <views::Sidebar desk={desk.clone()} />
            <views::ListPane desk={desk.clone()} />
            <views::ConversationPane desk={desk.clone()} />
            { for desk.editing_templates.clone().map(|team| html! { <templates::TemplatesEditor desk={desk.clone()} {team} /> }) }
            { for error }
        </div>
    }
}

fn performance_mark(name: &str) {
    if let Some(p) = web_sys::window().and_then(|w| w.performance()) {
        let _ = p.mark(name);
    }
}

fn main() {
    // The start-up, split for the desk benchmark: the app's code runs, the shell first answers who
    // is signed in, the first list is asked for (and `crewdesk:list …` once it is drawn).
    performance_mark("crewdesk:start");
    yew::Renderer::<App>::new().render();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(total: usize) -> Box<ListView> {
        Box::new(ListView { rows: Vec::new(), total, offset: 0, counts: Default::default() })
    }

    #[test]
    fn a_late_answer_to_an_older_list_request_is_dropped() {
        // Two quick filter changes at the same revision: the second request is answered first.
        let d = Rc::new(Desk::opening());
        let d = d.reduce(Action::Loaded(2, list(7)));
        let d = d.reduce(Action::Loaded(1, list(3)));
        assert_eq!(d.list.as_ref().map(|l| l.total), Some(7));
        let d = d.reduce(Action::Notifications(1, Vec::new()));
        assert_eq!(d.shown, 2);
        let d = d.reduce(Action::Loaded(3, list(4)));
        assert_eq!(d.list.as_ref().map(|l| l.total), Some(4));
    }
}
