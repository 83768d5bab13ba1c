"""Client wire protocols: pure functions from a received frame to the actions a session takes."""
