"""seqio Task and Mixture registrations for ul2lab (installed as `ul2lab_tasks`).

`import ul2lab_tasks` registers every task and mixture.
"""
from ul2lab_tasks import text  # noqa: F401  embedded_text_ul2, c4_ul2, local_text_task
from ul2lab_tasks import tables  # noqa: F401  table pretraining, table QA tasks and mixtures
from ul2lab_tasks import embedded_qa  # noqa: F401  embedded_tables_qa: table QA with no download
