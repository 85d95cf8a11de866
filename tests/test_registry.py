"""Handler lookup: what a type resolves to, and the errors that name the type."""

from __future__ import annotations

import pytest

from workers.core.registry import HandlerError, check_contract, handler_spec, load


def test_builtin_types_resolve_without_configuration():
    assert handler_spec("noop") == "workers.core.builtin:noop"
    assert load("sleep").__name__ == "sleep"


def test_configured_handler_wins_over_the_builtin():
    assert load("noop", "tests.handlers:record").__name__ == "record"


@pytest.mark.parametrize(("spec", "code", "needle"), [
    ("no_such_module:handle", "HANDLER_IMPORT_FAILED", "cannot import 'no_such_module'"),
    ("tests.handlers:missing", "HANDLER_INVALID", "has no 'missing'"),
    ("tests.handlers", "HANDLER_INVALID", "not 'module:function'"),
    ("tests.handlers:EFFECTS_DDL", "HANDLER_INVALID", "not callable"),
])
def test_bad_handlers_fail_naming_the_type(spec, code, needle):
    with pytest.raises(HandlerError) as err:
        load("mytype", spec)
    assert err.value.code == code
    assert "'mytype'" in str(err.value) and needle in str(err.value)


def test_handlers_must_take_job_and_ctx_and_not_be_async():
    def one_arg(job):
        return None

    async def coroutine(job, ctx):
        return None

    for func, needle in ((one_arg, "must accept (job, ctx)"), (coroutine, "not `async def`")):
        with pytest.raises(HandlerError) as err:
            check_contract("mytype", func)
        assert needle in str(err.value)


def test_unknown_type_without_handler_is_unknown_job_type():
    with pytest.raises(HandlerError) as err:
        handler_spec("nothing_serves_this")
    assert err.value.code == "UNKNOWN_JOB_TYPE"
