"""Kernel templates: functions that write one op's loops into a `KernelBuilder`, for any target's vector width."""
