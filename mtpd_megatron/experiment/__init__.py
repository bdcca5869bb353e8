"""Experiments: arms of one base config trained at equal tokens and seed, evaluated with the project's own
tools (main-head loss beside acceptance and decoding speed), reported as one table.

* spec.py      -- the experiment file (base config + named arms as overrides), checked before anything runs
* runner.py    -- train the arms (resumable, optionally several at once), evaluate each, write result files
* gradients.py -- where the heads' CE and KL pull the shared trunk, against the main head's own gradient
* report.py    -- results.json, results.md and the plots
"""
