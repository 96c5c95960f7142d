"""seqio Task and Mixture registrations for ul2lab (installed as `ul2lab_tasks`).

`import ul2lab_tasks` registers every task and mixture.
"""
