"""Baseline: the schema ``create_all`` made before migrations existed.

A database made by ``create_all`` is stamped at this revision (fleet/migrate.py). Enum
columns are plain VARCHAR(32) (``native_enum=False``, no CHECK), as the models declare.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "auditevent",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=48), nullable=False),
        sa.Column("subject", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.String(length=4000), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("hash"),
        sa.UniqueConstraint("prev_hash"),
    )
    op.create_index("ix_auditevent_action", "auditevent", ["action"])
    op.create_index("ix_auditevent_subject", "auditevent", ["subject"])

    op.create_table(
        "commissioningrun",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("enrollment_id", sa.Integer(), nullable=True),
        sa.Column("technician", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("steps", sa.String(length=4000), nullable=False),
        sa.Column("error", sa.String(length=200), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_commissioningrun_device_id", "commissioningrun", ["device_id"])
    op.create_index("ix_commissioningrun_enrollment_id", "commissioningrun", ["enrollment_id"])

    op.create_table(
        "coverage_report",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("night", sa.Date(), nullable=False),
        sa.Column("generated_at", sa.Float(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("plans", sa.Integer(), nullable=False),
        sa.Column("checks", sa.Integer(), nullable=False),
        sa.Column("problems", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("night"),
    )
    op.create_table(
        "device",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=True),
        sa.Column("resident_id", sa.String(length=64), nullable=True),
        sa.Column("site", sa.String(length=64), nullable=True),
        sa.Column("team", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("firmware", sa.String(length=32), nullable=True),
        sa.Column("connectivity", sa.String(length=32), nullable=True),
        sa.Column("offline_since", sa.Float(), nullable=True),
        sa.Column("last_seen", sa.Float(), nullable=True),
        sa.Column("boot_id", sa.String(length=64), nullable=True),
        sa.Column("reported_state", sa.String(length=32), nullable=True),
        sa.Column("reported_at", sa.Float(), nullable=True),
        sa.Column("armed_until", sa.Float(), nullable=True),
        sa.Column("camera", sa.String(length=32), nullable=True),
        sa.Column("clock_synced", sa.Boolean(), nullable=True),
        sa.Column("clock_skew_s", sa.Float(), nullable=True),
        sa.Column("next_seq", sa.Integer(), nullable=False),
        sa.Column("device_last_seq", sa.Integer(), nullable=False),
        sa.Column("hold_until", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_device_resident_id", "device", ["resident_id"])
    op.create_index("ix_device_team", "device", ["team"])

    op.create_table(
        "devicecertificate",
        sa.Column("serial", sa.String(length=40), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("not_before", sa.Float(), nullable=False),
        sa.Column("not_after", sa.Float(), nullable=False),
        sa.Column("renew_after", sa.Float(), nullable=False),
        sa.Column("issued_at", sa.Float(), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("public_key_sha256", sa.String(length=64), nullable=False),
        sa.Column("pem", sa.String(length=8192), nullable=False),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("reason", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("serial"),
    )
    op.create_index("ix_devicecertificate_device_id", "devicecertificate", ["device_id"])
    op.create_index("ix_devicecertificate_status", "devicecertificate", ["status", "not_after"])

    op.create_table(
        "devicehistory",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=True),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.String(length=2000), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_devicehistory_device_id", "devicehistory", ["device_id"])
    op.create_index("ix_devicehistory_serial", "devicehistory", ["serial"])

    op.create_table(
        "enrollment",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_code_hash", sa.String(length=64), nullable=False),
        sa.Column("user_code_hash", sa.String(length=64), nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=True),
        sa.Column("firmware", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("csr", sa.String(length=8192), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("interval_s", sa.Integer(), nullable=False),
        sa.Column("last_poll_at", sa.Float(), nullable=True),
        sa.Column("decided_at", sa.Float(), nullable=True),
        sa.Column("decided_by", sa.String(length=64), nullable=True),
        sa.Column("cert_serial", sa.String(length=40), nullable=True),
        sa.Column("delivered_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_code_hash"),
    )
    op.create_index("ix_enrollment_device_id", "enrollment", ["device_id"])
    op.create_index("ix_enrollment_serial", "enrollment", ["serial"])
    op.create_index("ix_enrollment_user_code_hash", "enrollment", ["user_code_hash"])

    op.create_table(
        "followup_sample",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("period_from", sa.Float(), nullable=False),
        sa.Column("period_to", sa.Float(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("population", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_followup_sample_created_at", "followup_sample", ["created_at"])

    op.create_table(
        "outbox_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=48), nullable=False),
        sa.Column("payload", sa.String(length=8000), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.Float(), nullable=False),
        sa.Column("delivered_at", sa.Float(), nullable=True),
        sa.Column("last_error", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
    )
    op.create_index("ix_outbox_event_next_attempt_at", "outbox_event", ["next_attempt_at"])

    op.create_table(
        "staffaccount",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("roles", sa.String(length=200), nullable=False),
        sa.Column("teams", sa.String(length=400), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "visit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=160), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=True),
        sa.Column("resident_id", sa.String(length=64), nullable=True),
        sa.Column("cause", sa.String(length=32), nullable=True),
        sa.Column("due_at", sa.Float(), nullable=False),
        sa.Column("raised_at", sa.Float(), nullable=False),
        sa.Column("evidence", sa.String(length=4000), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("device_back_at", sa.Float(), nullable=True),
        sa.Column("closed_at", sa.Float(), nullable=True),
        sa.Column("closed_by", sa.String(length=64), nullable=True),
        sa.Column("outcome", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    op.create_index("ix_visit_device_id", "visit", ["device_id"])

    op.create_table(
        "apitoken",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("staff_id", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["staff_id"],
            ["staffaccount.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_index("ix_apitoken_staff_id", "apitoken", ["staff_id"])

    op.create_table(
        "care_plan",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("resident_id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=True),
        sa.Column("team", sa.String(length=64), nullable=True),
        sa.Column("tz", sa.String(length=64), nullable=False),
        sa.Column("check_times", sa.String(length=400), nullable=False),
        sa.Column("nights", sa.String(length=7), nullable=False),
        sa.Column("window_s", sa.Integer(), nullable=False),
        sa.Column("look_s", sa.Integer(), nullable=False),
        sa.Column("recheck_delay_s", sa.Integer(), nullable=False),
        sa.Column("escalation", sa.String(length=100), nullable=False),
        sa.Column("call_timeout_s", sa.Integer(), nullable=False),
        sa.Column("escalate_unrecorded", sa.Boolean(), nullable=False),
        sa.Column("visit_on_opt_out", sa.Boolean(), nullable=False),
        sa.Column("valid_from", sa.Date(), nullable=False),
        sa.Column("valid_until", sa.Date(), nullable=True),
        sa.Column("consent_ref", sa.String(length=64), nullable=True),
        sa.Column("consent_date", sa.Date(), nullable=True),
        sa.Column("has_cohabitant", sa.Boolean(), nullable=False),
        sa.Column("cohabitant_consent_ref", sa.String(length=64), nullable=True),
        sa.Column("cohabitant_consent_date", sa.Date(), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("activated_at", sa.Float(), nullable=True),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("synced_through", sa.Date(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["device.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_care_plan_device_id", "care_plan", ["device_id"])
    op.create_index("ix_care_plan_resident_id", "care_plan", ["resident_id"])

    op.create_table(
        "command",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("jti", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=True),
        sa.Column("until", sa.Float(), nullable=True),
        sa.Column("look_id", sa.String(length=64), nullable=True),
        sa.Column("staff_id", sa.String(length=64), nullable=True),
        sa.Column("token", sa.String(length=2048), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("reason", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_sent_at", sa.Float(), nullable=True),
        sa.Column("acked_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["device.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "seq"),
        sa.UniqueConstraint("jti"),
    )
    op.create_index("ix_command_device_id", "command", ["device_id"])
    op.create_index("ix_command_pending", "command", ["status", "device_id"])

    op.create_table(
        "devicerecord",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=True),
        sa.Column("site", sa.String(length=64), nullable=True),
        sa.Column("resident_id", sa.String(length=64), nullable=True),
        sa.Column("plan_id", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=32), nullable=True),
        sa.Column("enrollment_id", sa.Integer(), nullable=True),
        sa.Column("paired_at", sa.Float(), nullable=False),
        sa.Column("paired_by", sa.String(length=64), nullable=False),
        sa.Column("live_at", sa.Float(), nullable=True),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("ended_by", sa.String(length=64), nullable=True),
        sa.Column("replaces", sa.String(length=64), nullable=True),
        sa.Column("replaced_by", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["device.id"],
        ),
        sa.PrimaryKeyConstraint("device_id"),
    )
    op.create_index("ix_devicerecord_serial", "devicerecord", ["serial"])
    op.create_index("ix_devicerecord_site", "devicerecord", ["site"])

    op.create_table(
        "followup_check",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("look_id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("resident_id", sa.String(length=64), nullable=True),
        sa.Column("staff_id", sa.String(length=64), nullable=False),
        sa.Column("requested_at", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("end_reason", sa.String(length=32), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=True),
        sa.Column("verdict", sa.String(length=16), nullable=True),
        sa.Column("comment", sa.String(length=1000), nullable=True),
        sa.Column("checked_by", sa.String(length=64), nullable=True),
        sa.Column("checked_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["sample_id"],
            ["followup_sample.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sample_id", "look_id"),
    )
    op.create_index("ix_followup_check_sample_id", "followup_check", ["sample_id"])

    op.create_table(
        "look",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("staff_id", sa.String(length=64), nullable=False),
        sa.Column("requested_at", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("end_reason", sa.String(length=32), nullable=True),
        sa.Column("answered", sa.Boolean(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["device.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_look_device_id", "look", ["device_id"])

    op.create_table(
        "staffcredential",
        sa.Column("staff_id", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=True),
        sa.Column("password_set_at", sa.Float(), nullable=True),
        sa.Column("totp_secret", sa.String(length=255), nullable=True),
        sa.Column("totp_enrolled_at", sa.Float(), nullable=True),
        sa.Column("totp_pending", sa.String(length=255), nullable=True),
        sa.Column("totp_last_step", sa.Integer(), nullable=False),
        sa.Column("failed_attempts", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["staff_id"],
            ["staffaccount.id"],
        ),
        sa.PrimaryKeyConstraint("staff_id"),
    )
    op.create_table(
        "visit_link",
        sa.Column("visit_id", sa.Integer(), nullable=False),
        sa.Column("check_id", sa.Integer(), nullable=True),
        sa.Column("plan_id", sa.Integer(), nullable=True),
        sa.Column("night", sa.Date(), nullable=True),
        sa.Column("team", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["visit_id"],
            ["visit.id"],
        ),
        sa.PrimaryKeyConstraint("visit_id"),
    )
    op.create_index("ix_visit_link_check_id", "visit_link", ["check_id"])
    op.create_index("ix_visit_link_night", "visit_link", ["night"])

    op.create_table(
        "websession",
        sa.Column("id_hash", sa.String(length=64), nullable=False),
        sa.Column("staff_id", sa.String(length=64), nullable=False),
        sa.Column("stage", sa.String(length=8), nullable=False),
        sa.Column("csrf", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("last_seen_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["staff_id"],
            ["staffaccount.id"],
        ),
        sa.PrimaryKeyConstraint("id_hash"),
    )
    op.create_index("ix_websession_staff_id", "websession", ["staff_id"])

    op.create_table(
        "window",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("start_local", sa.String(length=8), nullable=False),
        sa.Column("duration_s", sa.Integer(), nullable=False),
        sa.Column("weekdays", sa.String(length=7), nullable=False),
        sa.Column("tz", sa.String(length=64), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["device.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_window_device_id", "window", ["device_id"])

    op.create_table(
        "care_check",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=80), nullable=False),
        sa.Column("plan_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=True),
        sa.Column("resident_id", sa.String(length=64), nullable=False),
        sa.Column("team", sa.String(length=64), nullable=True),
        sa.Column("night", sa.Date(), nullable=False),
        sa.Column("agreed", sa.String(length=8), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=True),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("start_at", sa.Float(), nullable=False),
        sa.Column("end_at", sa.Float(), nullable=False),
        sa.Column("shift", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=True),
        sa.Column("looks", sa.Integer(), nullable=False),
        sa.Column("last_look_id", sa.String(length=64), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=True),
        sa.Column("outcome_by", sa.String(length=64), nullable=True),
        sa.Column("outcome_at", sa.Float(), nullable=True),
        sa.Column("unrecorded", sa.Boolean(), nullable=False),
        sa.Column("preflight_at", sa.Float(), nullable=True),
        sa.Column("closed_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["plan_id"],
            ["care_plan.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    op.create_index("ix_care_check_device_id", "care_check", ["device_id"])
    op.create_index("ix_care_check_night", "care_check", ["night"])
    op.create_index("ix_care_check_plan_id", "care_check", ["plan_id"])
    op.create_index("ix_care_check_start_at", "care_check", ["start_at"])
    op.create_index("ix_care_check_state_end", "care_check", ["state", "end_at"])

    op.create_table(
        "plan_opt_out",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("plan_id", sa.Integer(), nullable=False),
        sa.Column("night", sa.Date(), nullable=False),
        sa.Column("recorded_by", sa.String(length=64), nullable=False),
        sa.Column("recorded_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["plan_id"],
            ["care_plan.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("plan_id", "night"),
    )
    op.create_index("ix_plan_opt_out_plan_id", "plan_opt_out", ["plan_id"])

    op.create_table(
        "plan_pause",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("plan_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("start_at", sa.Float(), nullable=False),
        sa.Column("end_at", sa.Float(), nullable=True),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["plan_id"],
            ["care_plan.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_plan_pause_plan_id", "plan_pause", ["plan_id"])

    op.create_table(
        "escalation_step",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("check_id", sa.Integer(), nullable=False),
        sa.Column("plan_id", sa.Integer(), nullable=False),
        sa.Column("resident_id", sa.String(length=64), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("why", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("due_at", sa.Float(), nullable=False),
        sa.Column("done_at", sa.Float(), nullable=True),
        sa.Column("done_by", sa.String(length=64), nullable=True),
        sa.Column("result", sa.String(length=32), nullable=True),
        sa.Column("visit_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["check_id"],
            ["care_check.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("check_id", "step"),
    )
    op.create_index("ix_escalation_step_check_id", "escalation_step", ["check_id"])


def downgrade() -> None:
    op.drop_table("escalation_step")
    op.drop_table("plan_pause")
    op.drop_table("plan_opt_out")
    op.drop_table("care_check")
    op.drop_table("window")
    op.drop_table("websession")
    op.drop_table("visit_link")
    op.drop_table("staffcredential")
    op.drop_table("look")
    op.drop_table("followup_check")
    op.drop_table("devicerecord")
    op.drop_table("command")
    op.drop_table("care_plan")
    op.drop_table("apitoken")
    op.drop_table("visit")
    op.drop_table("staffaccount")
    op.drop_table("outbox_event")
    op.drop_table("followup_sample")
    op.drop_table("enrollment")
    op.drop_table("devicehistory")
    op.drop_table("devicecertificate")
    op.drop_table("device")
    op.drop_table("coverage_report")
    op.drop_table("commissioningrun")
    op.drop_table("auditevent")
