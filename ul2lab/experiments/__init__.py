"""Small, reproducible experiments that check what ul2lab's research recipes claim
(`python -m ul2lab.experiments NAME`; folders, READMEs and results under experiments/NAME/).

  continual_tables   continual table pretraining (table-T5): tables vs text vs no continuation,
                     then WikiTQ / TabFact finetuning and held-out losses
  schedules          infinite schedule (+ anneal branches) vs repeated cosine over 3 data phases
  objectives         UL2 MoD vs T5 span corruption vs prefix LM at equal compute, and a mode-token probe

The experiments sit on the top floor beside the CLI: every training, anneal and evaluation is a
call into ul2lab.runs (train_task, anneal, run_eval, heldout_loss) with the project's gin files, so
there is no second training loop here, only the order of the runs and the report.
"""
