"""The seven zsync functions: functions-framework HTTP targets, one per table and direction.

    functions-framework --source functions/main.py --target agent_jobs_to_supabase

Each target is generated from :data:`shared.core.spec.FUNCTIONS` and is thin: authenticate, parse, call
:mod:`shared.services.sync`, answer JSON (see :mod:`shared.edge.handler`).

=============================== ====== =====================================
target                          seed   what it does
=============================== ====== =====================================
agent_jobs_to_supabase          3A     Tables record -> Supabase upsert
agent_jobs_to_tables            3B     Supabase webhook -> Tables record
agent_decisions_to_supabase     3C     Tables record -> Supabase upsert
agent_decisions_to_tables       3D     Supabase webhook -> Tables record
audit_log_to_supabase           3E     Tables record -> Supabase insert (append-only)
rate_limits_to_supabase         3F     Tables record -> Supabase upsert
rate_limits_to_tables           3G     Supabase webhook -> Tables record
=============================== ====== =====================================
"""

from __future__ import annotations

import sys
from pathlib import Path

# functions-framework loads this file by path; make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.core.spec import FUNCTIONS
from shared.edge.handler import make_target

globals().update({name: make_target(name) for name in FUNCTIONS})
__all__ = sorted(FUNCTIONS)
