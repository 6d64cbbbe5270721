"""One event's path: decode -> wait for its turn -> pass the guard -> call Connect -> settle.

`handler` carries a delivery through the path; `decoding` turns a body into a request or a
MalformedEvent; `ordering` gives each event its turn in its conversation; `guard` says whether a
call may go now (the rate limiter and the breakers); `sending` calls Connect until it accepts or
the policy says stop; `connect_client` makes the call; `errors` classifies Connect's answers;
`policy` decides retry, hold or stop, and after how long; `settlement` acks,
dead-letters (the `envelope`) or hands back; `dedupe` remembers what was delivered.
"""
