def test_x():
    assert 1 + 1 == 2
