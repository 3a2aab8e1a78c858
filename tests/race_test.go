//go:build race

package tests

// raceEnabled: the tests run with -race, so imgfs is built with it too.
const raceEnabled = true
