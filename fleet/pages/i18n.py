"""Page texts in Swedish (the default) and English.

The language is ``?lang=sv|en`` (remembered in a cookie), else the browser's
``Accept-Language``, else Swedish. A key missing from a table is a bug the page tests find:
:func:`text` raises instead of showing a key to a member of staff at night.
"""

from __future__ import annotations

from fastapi import Request

LANGS = ("sv", "en")
DEFAULT = "sv"

TEXTS: dict[str, tuple[str, str]] = {
    # key: (svenska, English)
    "app": ("Tillsyn", "Tillsyn"),
    "skip": ("Hoppa till innehållet", "Skip to content"),
    "language": ("Språk", "Language"),
    "other_lang": ("In English", "På svenska"),
    "logout": ("Logga ut", "Log out"),
    "signed_in_as": ("Inloggad som", "Signed in as"),
    "nav": ("Huvudmeny", "Main menu"),
    "nav_night": ("Nattens tillsyner", "Tonight's checks"),
    "nav_tech": ("Enheter", "Devices"),
    "nav_pair": ("Parkoppla enhet", "Pair a device"),
    "nav_audit": ("Granskningslogg", "Audit log"),
    "nav_followup": ("Uppföljning", "Follow-up"),
    "nav_resident": ("Loggutdrag per brukare", "Per-resident extract"),
    # login
    "login_title": ("Logga in", "Log in"),
    "staff_id": ("Användar-id", "Staff id"),
    "password": ("Lösenord", "Password"),
    "next": ("Fortsätt", "Continue"),
    "login_failed": (
        "Inloggningen misslyckades. Kontrollera användar-id och lösenord.",
        "Login failed. Check your staff id and password.",
    ),
    "code_failed": ("Koden stämmer inte. Försök igen.", "The code is not right. Try again."),
    "locked": (
        "För många misslyckade försök: kontot är tillfälligt låst. Vänta eller kontakta IT.",
        "Too many failed attempts: the account is locked for a while. Wait, or call IT.",
    ),
    "expired": (
        "Din inloggning har gått ut. Logga in igen.",
        "Your session has ended. Please log in again.",
    ),
    "logged_out": ("Du är utloggad.", "You are logged out."),
    "totp_title": ("Tvåstegsverifiering", "Two-step verification"),
    "totp_help": (
        "Skriv den sexsiffriga koden från autentiseringsappen i din telefon.",
        "Enter the six-digit code from the authenticator app on your phone.",
    ),
    "code": ("Kod", "Code"),
    "verify": ("Logga in", "Log in"),
    "enrol_title": ("Koppla autentiseringsapp", "Set up your authenticator app"),
    "enrol_help": (
        "Skanna QR-koden med en autentiseringsapp (t.ex. Microsoft eller Google "
        "Authenticator, FreeOTP). Skriv sedan in koden som appen visar.",
        "Scan the QR code with an authenticator app (e.g. Microsoft or Google "
        "Authenticator, FreeOTP). Then enter the code the app shows.",
    ),
    "qr_label": ("QR-kod för autentiseringsappen", "QR code for the authenticator app"),
    "manual_key": ("Kan du inte skanna? Skriv in nyckeln:", "Cannot scan? Type in the key:"),
    "enrol_done": ("Aktivera", "Activate"),
    # night
    "night_title": ("Nattens tillsyner", "Tonight's checks"),
    "night_intro": (
        "Tillsyner i tidsordning. Sidan uppdateras av sig själv.",
        "Checks in time order. The page updates by itself.",
    ),
    "updated": ("Uppdaterad", "Updated"),
    "no_checks": ("Inga tillsyner i natt.", "No checks tonight."),
    "resident": ("Brukare", "Resident"),
    "device": ("Enhet", "Device"),
    "window": ("Tidsfönster", "Window"),
    "state": ("Läge", "State"),
    "recheck": ("Omkontroll", "Recheck"),
    "start_look": ("Titta nu", "Start look"),
    "look_again": ("Titta igen", "Look again"),
    "outcome_seen": ("Sedd, allt väl", "Seen, all well"),
    "outcome_not_seen": ("Inte sedd", "Not seen"),
    "outcome_something_wrong": ("Något är fel", "Something is wrong"),
    "outcome_q": ("Vad såg du?", "What did you see?"),
    "opens_at": ("Öppnar", "Opens"),
    "st_upcoming": ("Kommande", "Upcoming"),
    "st_open": ("Öppen: titta nu", "Open: look now"),
    "st_looked": ("Tittat: ange utfall", "Looked: record outcome"),
    "st_seen": ("Sedd", "Seen"),
    "st_not_seen": ("Inte sedd", "Not seen"),
    "st_recheck_due": ("Inte sedd: omkontroll", "Not seen: recheck due"),
    "st_escalated": ("Eskalerad: följ åtgärdsplanen", "Escalated: follow the action plan"),
    "st_visit": ("Hembesök", "Home visit"),
    "st_missed": ("Missad", "Missed"),
    "st_opted_out": ("Avbokad av brukaren", "Opted out by the resident"),
    "st_paused": ("Pausad", "Paused"),
    "st_cancelled": ("Inställd", "Cancelled"),
    "visits_title": ("Hembesök att göra", "Physical visits to make"),
    "no_visits": ("Inga hembesök just nu.", "No visits right now."),
    "due": ("Senast", "Due"),
    "cause": ("Orsak", "Cause"),
    "acknowledge": ("Jag åker", "I'm on it"),
    "acknowledged": ("Påbörjat", "Acknowledged"),
    "close_visit": ("Klarmarkera", "Mark done"),
    "visit_result": ("Resultat av besöket", "Result of the visit"),
    "cause_device_offline": ("Enheten är offline", "Device offline"),
    "cause_arm_unconfirmed": ("Kameran kunde inte aktiveras", "Camera could not be armed"),
    "cause_camera_fault": ("Kamerafel", "Camera fault"),
    "cause_not_seen_twice": ("Inte sedd två gånger", "Not seen twice"),
    "cause_opted_out": ("Brukaren avbokade natten", "Resident opted out of the night"),
    "cause_something_wrong": ("Något var fel vid tillsynen", "Something was wrong"),
    "cause_no_outcome": ("Inget utfall registrerat", "No outcome recorded"),
    "cause_clock_unsynced": ("Enhetens klocka går fel", "Device clock not synchronised"),
    "cause_lock_mismatch": ("Enhetens låsläge stämmer inte", "Device lock state wrong"),
    "calls_title": ("Samtal att ringa", "Calls to make"),
    "call_resident": ("Ring brukaren", "Call the resident"),
    "step_resolved": ("Löst: brukaren svarade", "Resolved: resident answered"),
    "step_not_resolved": ("Inte löst", "Not resolved"),
    "ok_look": ("Tillsynen har startat.", "The look has started."),
    "ok_outcome": ("Utfallet är sparat.", "The outcome is saved."),
    "ok_visit": ("Sparat.", "Saved."),
    "err_action": ("Det gick inte:", "That did not work:"),
    "live_error": (
        "Kan inte nå servern: visar senast kända läge.",
        "Cannot reach the server: showing the last known state.",
    ),
    # tech
    "tech_title": ("Enheter i mitt område", "Devices in my area"),
    "no_devices": ("Inga enheter.", "No devices."),
    "team": ("Område", "Area"),
    "connectivity": ("Anslutning", "Connection"),
    "lock_state": ("Låsläge", "Lock state"),
    "camera": ("Kamera", "Camera"),
    "firmware": ("Programvara", "Firmware"),
    "last_seen": ("Senast hörd", "Last heard"),
    "pair_link": ("Parkoppla en ny enhet", "Pair a new device"),
    # audit
    "audit_title": ("Granskningslogg", "Audit log"),
    "chain_ok": ("Kedjan är hel", "The chain is intact"),
    "chain_broken": ("Kedjan är bruten vid post", "The chain is broken at entry"),
    "entries": ("poster", "entries"),
    "filter": ("Filtrera", "Filter"),
    "action": ("Händelse", "Action"),
    "actor": ("Utförd av", "Actor"),
    "subject": ("Gäller", "Subject"),
    "from": ("Från", "From"),
    "to": ("Till och med", "To (inclusive)"),
    "time": ("Tid", "Time"),
    "detail": ("Detaljer", "Detail"),
    "older": ("Äldre poster", "Older entries"),
    "no_entries": ("Inga poster.", "No entries."),
    "followup_title": ("Uppföljning av loggar", "Log follow-up"),
    "followup_intro": (
        "Dra ett slumpmässigt urval av tillsyner under en period och granska var och en.",
        "Draw a random sample of the looks in a period and check each one.",
    ),
    "size": ("Antal", "How many"),
    "draw": ("Dra urval", "Draw sample"),
    "sample": ("Urval", "Sample"),
    "period": ("Period", "Period"),
    "looks_in_period": ("tittar i perioden", "looks in the period"),
    "checked": ("granskade", "checked"),
    "no_samples": ("Inga urval ännu.", "No samples yet."),
    "staff": ("Personal", "Staff"),
    "requested": ("Begärd", "Requested"),
    "duration": ("Längd", "Duration"),
    "outcome": ("Utfall", "Outcome"),
    "verdict": ("Bedömning", "Verdict"),
    "comment": ("Kommentar", "Comment"),
    "verdict_ok": ("Utan anmärkning", "OK"),
    "verdict_deviation": ("Avvikelse", "Deviation"),
    "mark": ("Spara granskning", "Save check"),
    "checked_by": ("Granskad av", "Checked by"),
    "export_csv": ("Exportera CSV", "Export CSV"),
    "export_pdf": ("Exportera PDF", "Export PDF"),
    "resident_title": ("Loggutdrag för en brukare", "Log extract for one resident"),
    "resident_intro": (
        "Vem har tittat till brukaren och när (brukarens rätt att ta del av loggen). "
        "Varje utdrag loggas.",
        "Who looked at the resident and when (the resident's right to see the log). "
        "Every extract is logged.",
    ),
    "show": ("Visa", "Show"),
    "no_looks": ("Inga tittar i loggen.", "No looks in the log."),
    "forbidden": ("Du har inte behörighet till sidan.", "You may not open this page."),
    "not_found": ("Hittades inte.", "Not found."),
}


def pick(request: Request) -> str:
    wanted = request.query_params.get("lang") or request.cookies.get("lang")
    if wanted in LANGS:
        return wanted
    for part in request.headers.get("accept-language", "").split(","):
        code = part.split(";")[0].strip().lower()[:2]
        if code in LANGS:
            return code
    return DEFAULT


def text(lang: str, key: str) -> str:
    sv, en = TEXTS[key]
    return en if lang == "en" else sv
