"""The web administration UI every coordinator serves under `/ui`: server-rendered pages
(Jinja2), one small script that polls HTML fragments and sends the confirmed actions.

Data the primary owns (the transfer log, resubmits, dead letters) is fetched from the
primary's transaction manager, whose URL the coordinator knows from its heartbeats; every
call carries the logged-in administrator's own token, so the API's role checks apply.
"""
