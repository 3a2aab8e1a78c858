//go:build !race

package tests

// raceEnabled: the tests run without -race.
const raceEnabled = false
